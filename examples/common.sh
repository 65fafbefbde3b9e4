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
