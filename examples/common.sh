# Sourced by the example scripts BEFORE they cd to the repository: paths the caller gives in the
# environment are made absolute against the caller's directory, so `DATA_PATH=data/x bash
# path/to/examples/pretrain_phi1.sh` reads ./data/x of the directory it was typed in. Defaults (used
# when a variable is unset) stay relative to the repository.
CALLER_DIR=$PWD

# abs_path PATH: absolute against the caller's directory (absolute and empty values unchanged)
abs_path() {
    case "$1" in
        "" | /*) printf '%s' "$1" ;;
        *) printf '%s/%s' "$CALLER_DIR" "$1" ;;
    esac
}

# abs_if_exists NAME: absolute when NAME exists relative to the caller (else, e.g., a Hugging Face Hub name)
abs_if_exists() {
    if [[ -n "$1" && "$1" != /* && -e "$CALLER_DIR/$1" ]]; then printf '%s/%s' "$CALLER_DIR" "$1"; else printf '%s' "$1"; fi
}

# abs_data_path "PREFIX" or "W1 PREFIX1 W2 PREFIX2 ...": prefixes made absolute, weights kept
abs_data_path() {
    local out=() word
    for word in $1; do
        if [[ "$word" =~ ^[0-9.]+([eE][-+]?[0-9]+)?$ ]]; then out+=("$word"); else out+=("$(abs_path "$word")"); fi
    done
    printf '%s' "${out[*]}"
}

# resolve_env VAR...: abs_path each variable that the caller set
resolve_env() {
    local name
    for name in "$@"; do
        if [[ -n "${!name:-}" ]]; then printf -v "$name" '%s' "$(abs_path "${!name}")"; fi
    done
}

# use_one_cuda_queue_if_tensor_parallel TP: with TP > 1, one hardware queue, so each input-gradient
# collective is queued before the weight-gradient GEMM it overlaps (as Megatron sets it); results are
# the same either way
use_one_cuda_queue_if_tensor_parallel() {
    if [[ "$1" -gt 1 ]]; then export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}; fi
}

# default_tokenizer: phi-1's tokenizer files beside the checkout (../shared, as the tests use them) when
# present, else the Hugging Face Hub name (downloaded on first use: offline, set TOKENIZER to a folder).
# Run after the script has changed to the repository.
default_tokenizer() {
    if [[ -f ../shared/tokenizers/codegen-350M-mono/tokenizer.json ]]; then
        printf '%s' ../shared/tokenizers/codegen-350M-mono
    else
        echo "$(basename "$0"): TOKENIZER not set and ../shared/tokenizers/codegen-350M-mono not found: using the Hub name Salesforce/codegen-350M-mono (offline, set TOKENIZER=path/to/codegen-350M-mono)" >&2
        printf '%s' Salesforce/codegen-350M-mono
    fi
}

# require_data "W1 PREFIX1 ..." TOKENIZER: each PREFIX.bin/.idx must exist; otherwise one line with the
# command that makes it (README.md, "Training": from a corpus to a recipe run), exit 2
require_data() {
    local word
    for word in $1; do
        [[ "$word" =~ ^[0-9.]+([eE][-+]?[0-9]+)?$ ]] && continue
        if [[ ! -f "$word.bin" || ! -f "$word.idx" ]]; then
            local missing=$word.bin; [[ -f "$word.bin" ]] && missing=$word.idx
            echo "$(basename "$0"): DATA_PATH: $missing does not exist; make it from a corpus with: python tools/preprocess_data.py --input CORPUS.jsonl --tokenizer $2 --output-prefix ${word%_text_document} (README.md, Training), or set DATA_PATH" >&2
            exit 2
        fi
    done
}

# precision_for_this_machine PRECISION WAS_SET: the paper's fp16 needs a GPU; without one (no NVIDIA or
# AMD GPU device file, and PRECISION not set by the caller) the run uses fp32 and says so in one line.
# Device files, not torch: importing torch here would add seconds to every start.
precision_for_this_machine() {
    if [[ "$2" == 0 && "$1" != fp32 ]] && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null && [[ ! -e /dev/kfd ]]; then
        echo "$(basename "$0"): no GPU found: training in fp32 instead of the recipe's $1 (set PRECISION to choose)" >&2
        printf '%s' fp32
    else
        printf '%s' "$1"
    fi
}
