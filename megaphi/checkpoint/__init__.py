"""On-disk formats: training checkpoints, model folders, their integrity, and conversions.

    layout          names of files and folders, tags, the `latest` / `best` pointers, CheckpointError
    atomic          the one atomic write (temporary name, fsync, rename) for files and folders
    collective      rank, barrier, broadcast and gather over the global group (or one plain process)
    integrity       per-file checksums recorded at save and verified at load; the metadata's own seal
    lock            one run per --save folder (an flock)
    save_failures   a failed save: one line, the partial folder removed
    rng_state       every RNG stream of a rank, as saved in a checkpoint
    training_state  save / verify / load of training checkpoints through DeepSpeed
    resume_checks   a resume with changed flags: adopted or refused, one line each
    hf_names        model parameter names <-> Hugging Face PhiForCausalLM names
    hf_config       PhiConfig <-> Hugging Face config.json
    hf_folder       reading Hugging Face phi folders (HF or MixFormer names)
    model_folder    writing model folders; reading weights from whatever a path holds (explicit dispatch)
    reshard         tensor-parallel shards of training checkpoints: merge, split, reshard
    convert         Hugging Face <-> megaphi conversions (`megaphi-convert`)

Nothing is imported here: import the module you need (`from megaphi.checkpoint import training_state`).
"""
