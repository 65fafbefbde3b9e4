"""Training at --pipeline-model-parallel-size P > 1: this rank's model chunks, their optimizer step,
and the engine interface the Trainer drives (the DeepSpeed engine's at P = 1).

Each rank holds the chunks of its pipeline stage (megaphi.parallel.pipeline.build_model_chunks) and a
plain AdamW over their parameters, with megaphi's lr schedule; there is no DeepSpeed engine at P > 1.
DeepSpeed's engine reduces, clips and checks overflow over one module: the gradient norm and the fp16
overflow decision would cover one stage only, its backward needs a loss (which only the last stage
has), and its checkpoint files are named by TP rank alone. docs/pipeline.md gives the reasons at
length. One step here: the 1F1B (or interleaved) schedule accumulates the micro-batches' gradients,
then they are averaged over the stage's data-parallel group, clipped by the whole model's norm
(reduced over TP and pipeline ranks), and AdamW and the lr schedule step on every stage together.

The last stage computes the loss; its per-micro-batch [loss sum, token count] logs are broadcast over
the pipeline group so every rank returns the same logs and rank 0 (on the first stage) logs them.
"""

import os

import torch
import torch.distributed as dist
from torch import nn

from megaphi.parallel import state
from megaphi.parallel.pipeline import (
    StageCommunicator,
    allreduce_data_parallel_gradients,
    any_stage_overflowed,
    boundary_shape,
    build_model_chunks,
    clip_grad_norm_across_stages,
    forward_backward_pipelining,
    global_grad_norm,
    seed_pipeline_stage,
)


class PipelineModule(nn.Module):
    """This rank's model chunks as one module. The chunks name their parameters as PhiForCausalLM
    does (`model.layers.7...`) and never share a name, so `model_state_dict` is a slice of the
    unsplit model's state dict; `save_pretrained` gathers every stage's slice into one model folder."""

    def __init__(self, chunks, config):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        self.config = config

    def model_state_dict(self):
        merged = {}
        for chunk in self.chunks:
            merged.update(chunk.state_dict())
        return merged

    def load_model_state_dict(self, saved, source):
        expected = self.model_state_dict()
        if set(saved) != set(expected):
            missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise ValueError(
                f"{source}: parameters differ from this stage's (missing {missing[:3]}, extra {extra[:3]})"
            )
        for chunk in self.chunks:
            chunk.load_state_dict({name: saved[name] for name in chunk.state_dict()})

    def load_hf_state_dict(self, hf_state, source="state dict"):
        """Each chunk takes its layers (and each TP rank its shard) of a whole model's HF state dict."""
        from megaphi.checkpoint.hf_names import load_hf_state_into

        with torch.no_grad():
            for chunk in self.chunks:
                load_hf_state_into(chunk, hf_state, source)

    def save_pretrained(self, path, bos_token_id=None, eos_token_id=None):
        """Collective: the unsplit model's folder (what PhiForCausalLM.save_pretrained writes), by rank 0."""
        from megaphi.checkpoint.hf_names import model_to_hf_names
        from megaphi.checkpoint.model_folder import save_megaphi_folder
        from megaphi.parallel.mappings import gather_shards

        per_chunk = []
        for chunk in self.chunks:  # TP shards gathered (collective over TP), in chunk order
            tensors = {}
            for name, param in chunk.named_parameters():
                t = param.detach()
                if getattr(param, "tensor_model_parallel", False) and state.get_tensor_model_parallel_world_size() > 1:
                    t = gather_shards(t, param.partition_dim)
                tensors[name] = t.cpu().contiguous()
            per_chunk.append(tensors)
        group, ranks = state.get_pipeline_model_parallel_group(), state.get_pipeline_model_parallel_group_ranks()
        gathered = [None] * len(ranks) if dist.get_rank() == ranks[0] else None
        dist.gather_object(per_chunk, gathered, dst=ranks[0], group=group)
        if dist.get_rank() != 0:
            return
        merged = {}
        for chunk_index in range(len(per_chunk)):  # virtual stage c * P + r: the unsplit model's order
            for stage_chunks in gathered:
                merged.update(stage_chunks[chunk_index])
        save_megaphi_folder(path, self.config, model_to_hf_names(merged, self.config), bos_token_id, eos_token_id)


class PipelineEngine:
    """What the Trainer uses of a DeepSpeed engine, for one pipeline stage (see the module docstring)."""

    def __init__(self, module, optimizer, lr_scheduler, clip_grad, comms, main_weights=None, loss_scale=None):
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.clip_grad = clip_grad
        self.train_comm, self.eval_comm = comms
        self.main_weights, self.loss_scale = main_weights, loss_scale  # bf16 / fp16 (pipeline_precision)
        self.dp_group = state.get_data_parallel_group()
        self.skipped_steps = 0  # fp16 steps skipped for an overflow on any stage
        self.global_steps = 0
        self.norm = None

    @property
    def chunks(self):
        return list(self.module.chunks)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def fp16_enabled(self):
        return self.loss_scale is not None

    def bfloat16_enabled(self):
        return self.main_weights is not None and self.loss_scale is None

    def current_loss_scale(self):
        return 1.0 if self.loss_scale is None else self.loss_scale.scale

    @property
    def grad_holders(self):
        """What holds the gradients the step reduces, clips and applies: the fp32 main weights, or the chunks."""
        return [self.main_weights] if self.main_weights is not None else self.chunks

    def zero_optimization_stage(self):
        return 1 if self.sharded else 0

    @property
    def sharded(self):
        """ZeRO-1: the optimizer state is split over the stage's data-parallel ranks."""
        return hasattr(self.optimizer, "consolidate_state_dict")

    def get_global_grad_norm(self):
        return self.norm

    def latest(self):
        """The last step's whole-model gradient norm before clipping (the Trainer's grad-norm source)."""
        return self.norm

    def step(self):
        """After the schedule: average over data parallelism, clip by the whole model's norm, update."""
        holders = self.grad_holders
        allreduce_data_parallel_gradients(holders, self.dp_group)
        if self.loss_scale is not None:
            inverse = 1.0 / self.loss_scale.scale
            for main in self.main_weights.parameters():
                if main.grad is not None:
                    main.grad.mul_(inverse)
            overflow = any_stage_overflowed(holders)  # one answer on every stage and TP rank
            self.loss_scale.update(overflow)
            if overflow:
                self.skipped_steps += 1
                self.norm = None
                self.optimizer.zero_grad(set_to_none=True)
                return
        if self.clip_grad > 0:
            self.norm = clip_grad_norm_across_stages(holders, self.clip_grad)
        else:
            self.norm = global_grad_norm(holders)
        self.optimizer.step()
        if self.main_weights is not None:
            self.main_weights.copy_to_model()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    # Checkpoints: one file per (pipeline, tensor) rank, written by data-parallel rank 0; with ZeRO-1
    # each data-parallel rank also writes its share of the optimizer state (resumed at the same DP
    # size). The client state carries megaphi's counters (integrity.check_deepspeed_record).
    def state_file(self, directory, pipeline_rank=None, tensor_rank=None):
        p = state.get_pipeline_model_parallel_rank() if pipeline_rank is None else pipeline_rank
        t = state.get_tensor_model_parallel_rank() if tensor_rank is None else tensor_rank
        return os.path.join(directory, f"pp_rank_{p:02d}_mp_rank_{t:02d}_model_states.pt")

    def optimizer_shard_file(self, directory):
        p, t = state.get_pipeline_model_parallel_rank(), state.get_tensor_model_parallel_rank()
        d = state.get_data_parallel_rank()
        return os.path.join(directory, f"pp_rank_{p:02d}_mp_rank_{t:02d}_dp_rank_{d:03d}_optim_states.pt")

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=False):
        from megaphi.checkpoint.atomic import write_atomic

        tag_dir = os.path.join(save_dir, tag)
        if self.sharded:
            shard = self.optimizer.optim.state_dict()  # this rank's share (the local AdamW)
            write_atomic(self.optimizer_shard_file(tag_dir), lambda tmp: torch.save(shard, tmp))
        if state.get_data_parallel_rank() != 0:
            return
        payload = {
            "module": self.module.model_state_dict(),
            "optimizer": None if self.sharded else self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "global_steps": self.global_steps,
            "main_weights": None if self.main_weights is None else self.main_weights.state_dict(),
            "loss_scale": None if self.loss_scale is None else self.loss_scale.state_dict(),
            "pipeline_model_parallel_size": state.get_pipeline_model_parallel_world_size(),
            **(client_state or {}),
        }
        write_atomic(self.state_file(tag_dir), lambda tmp: torch.save(payload, tmp))

    def load_checkpoint(
        self, load_dir, tag, load_optimizer_states=True, load_lr_scheduler_states=True, load_module_only=False
    ):
        path = self.state_file(os.path.join(load_dir, tag))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (saved with another --pipeline-model-parallel-size?)")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        self.module.load_model_state_dict(saved["module"], path)
        if self.main_weights is not None and saved.get("main_weights") is not None:
            self.main_weights.load_state_dict(saved["main_weights"], path)
        elif self.main_weights is not None:  # saved in fp32, or resharded (weights only): start from the model's
            self.main_weights.copy_from_model()
        if self.loss_scale is not None and saved.get("loss_scale"):
            self.loss_scale.load_state_dict(saved["loss_scale"])
        if not load_module_only:
            if load_optimizer_states and self.sharded:
                shard = self.optimizer_shard_file(os.path.join(load_dir, tag))
                if not os.path.isfile(shard):
                    raise FileNotFoundError(f"{shard} is missing (saved without ZeRO-1 or at another DP size?)")
                self.optimizer.optim.load_state_dict(torch.load(shard, map_location="cpu", weights_only=False))
            elif load_optimizer_states:
                if saved["optimizer"] is None:
                    raise ValueError(
                        f"{path}: saved with ZeRO-1 (optimizer state in shards); resume with --zero-stage 1"
                    )
                self.optimizer.load_state_dict(saved["optimizer"])
            if load_lr_scheduler_states:
                self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
            self.global_steps = saved.get("global_steps", 0)
        return path, {k: v for k, v in saved.items() if k == "megaphi"}


def sharded_adamw(groups, o, device_type):
    """ZeRO-1 over the stage's data-parallel group: torch's ZeroRedundancyOptimizer gives each rank
    the AdamW state of a share of the parameters, steps that share and broadcasts it. Adam updates
    each element by itself, so this is the unsharded AdamW's arithmetic, with 1/DP of its state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if o.optimizer_impl not in ("auto", "torch", "torch-fused"):
        raise ValueError(f"--optimizer-impl {o.optimizer_impl}: pipelined ZeRO-1 shards torch's AdamW only")
    fused = o.optimizer_impl == "torch-fused" or (o.optimizer_impl == "auto" and device_type == "cuda")
    return ZeroRedundancyOptimizer(
        groups,
        optimizer_class=torch.optim.AdamW,
        process_group=state.get_data_parallel_group(),
        lr=o.lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
        weight_decay=o.weight_decay,
        fused=True if fused else None,
    )


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _load_finetune_weights(config, module):
    """--finetune / --skip-train: the weights of --load's model folder (a training checkpoint's
    exported `<tag>/model` included) into this stage's chunks; returns the Trainer's source pair."""
    from megaphi.checkpoint import model_folder
    from megaphi.checkpoint.layout import CheckpointError
    from megaphi.training.train_loop import print_rank0

    ckpt = config.checkpoint
    source = model_folder.finetune_weights_source(ckpt.load)
    if source[0] != "folder":
        raise CheckpointError(
            f"--load {ckpt.load}: with --pipeline-model-parallel-size > 1 the weights are read from a model "
            f"folder; this checkpoint has none (saved with --no-export-model): export one with "
            f"tools/convert_checkpoint.py or load it at --pipeline-model-parallel-size 1"
        )
    model_folder.load_weights_from_folder(module, source[1])
    verb = "evaluating the" if config.training.skip_train else "finetuning from"
    print_rank0(f"{verb} weights in {source[1]}")
    return source


def build_pipeline_engine(config, model_config):
    """(PipelineEngine, the whole model's parameter count per TP rank, the --finetune weights source
    or None) for this rank's stage."""
    from megaphi.training.lr_schedule import WarmupDecayLR
    from megaphi.training.optimizer import build_optimizer, param_groups
    from megaphi.training.pipeline_precision import DynamicLossScale, MainWeights

    p, t, o = config.parallel, config.training, config.optimizer
    pp, rank = p.pipeline_model_parallel_size, state.get_pipeline_model_parallel_rank()
    runtime = config.model_runtime()
    # the seed PhiForCausalLM takes at P = 1 (torch.initial_seed() after set_seed): the same weights
    chunks = build_model_chunks(
        model_config,
        rank,
        pp,
        p.virtual_pipeline_stages,
        list(p.pipeline_layers_per_stage) if p.pipeline_layers_per_stage else None,
        init_seed=t.seed,
        runtime=runtime,
    )
    seed_pipeline_stage(t.seed)  # dropout: each stage its own streams (seed + 100 x stage, as Megatron)
    device = _device()
    module = PipelineModule(chunks, model_config)
    finetune_source = _load_finetune_weights(config, module) if config.checkpoint.finetune else None
    module.to(device)
    main_weights = loss_scale = None
    if o.bf16 or o.fp16:  # built in fp32 and rounded, as DeepSpeed's engine does at P = 1
        module.to(torch.bfloat16 if o.bf16 else torch.float16)
        main_weights = MainWeights(module)
    if o.fp16:
        f = config.flags
        loss_scale = DynamicLossScale(
            f["initial_loss_scale"], f["loss_scale_window"], f["hysteresis"], f["min_loss_scale"]
        )
    local = torch.tensor([sum(q.numel() for q in module.parameters())], dtype=torch.int64, device=device)
    dist.all_reduce(local, group=state.get_pipeline_model_parallel_group())
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(module, o.weight_decay)]
    if main_weights is not None:
        groups = main_weights.groups(groups)
    if p.zero_stage == 1 and state.get_data_parallel_world_size() > 1:
        optimizer = sharded_adamw(groups, o, device.type)
    elif main_weights is not None:
        fused = o.optimizer_impl == "torch-fused" or (o.optimizer_impl == "auto" and device.type == "cuda")
        betas = (o.adam_beta1, o.adam_beta2)
        optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=betas, eps=o.adam_eps, weight_decay=o.weight_decay, fused=True if fused else None
        )
    else:
        optimizer = build_optimizer(
            module, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), o.adam_eps, device.type, o.optimizer_impl
        )
    scheduler = WarmupDecayLR(optimizer, o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters, o.lr_decay_style)
    dtype = next(module.parameters()).dtype
    hidden, sp = model_config.hidden_size, runtime.sequence_parallel

    def communicator(sequence_parallel):
        shape = boundary_shape(t.micro_batch_size, t.seq_length, hidden, sequence_parallel)
        return StageCommunicator(shape, dtype, device=device)

    comms = (communicator(sp), communicator(False))
    engine = PipelineEngine(module, optimizer, scheduler, o.clip_grad, comms, main_weights, loss_scale)
    return engine, int(local.item()), finetune_source


def _broadcast_logs(logs, num_microbatches, device):
    """The last stage's per-micro-batch {"lm loss": [sum, count]} on every rank of the pipeline."""
    ranks = state.get_pipeline_model_parallel_group_ranks()
    if state.is_pipeline_last_stage():
        values = torch.stack([d["lm loss"].to(device, torch.float64).reshape(2) for d in logs])
    else:
        values = torch.empty((num_microbatches, 2), dtype=torch.float64, device=device)
    dist.broadcast(values, src=ranks[-1], group=state.get_pipeline_model_parallel_group())
    if state.is_pipeline_last_stage():
        return logs
    return [{"lm loss": row} for row in values]


def _run_schedule(forward_step, data_iterator, engine, num_microbatches, forward_only, count_tokens_func, dp_group):
    batches = [next(data_iterator) for _ in range(num_microbatches)]  # every chunk reads the same micro-batches
    chunks = engine.chunks
    if engine.loss_scale is not None and not forward_only:
        from megaphi.training.pipeline_precision import scale_loss_func

        forward_step = scale_loss_func(forward_step, engine.loss_scale.scale)
    logs = forward_backward_pipelining(
        forward_step,
        [iter(batches) for _ in chunks],
        chunks,
        num_microbatches,
        engine.eval_comm if forward_only else engine.train_comm,
        forward_only=forward_only,
        count_tokens_func=count_tokens_func,
        dp_group=dp_group,
    )
    return _broadcast_logs(logs, num_microbatches, next(engine.module.parameters()).device)


def pipelined_train_step(forward_step, data_iterator, engine, num_microbatches, count_tokens_func=None, dp_group=None):
    """The Trainer's schedule at P > 1 (forward_backward_no_pipelining's signature): one optimizer
    step over the next global batch; returns the per-micro-batch loss logs on every rank."""
    logs = _run_schedule(forward_step, data_iterator, engine, num_microbatches, False, count_tokens_func, dp_group)
    engine.step()
    return logs


def pipelined_evaluate(engine, forward_step, make_valid_iterator, eval_iters, num_microbatches, dp_group):
    """train_loop.evaluate through the forward-only pipeline plan: the token-average validation loss."""
    from megaphi.training.schedules import reduce_loss_dicts

    engine.eval()
    data = make_valid_iterator()
    logs = []
    try:
        for _ in range(eval_iters):
            logs += _run_schedule(forward_step, data, engine, num_microbatches, True, None, dp_group)
    finally:
        engine.train()
    return reduce_loss_dicts(logs, dp_group)["lm loss"]
