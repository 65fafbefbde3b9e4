// Dataset index builders with Megatron-LM GPTDataset / BlendedDataset semantics.
//
// build_sample_index: the [num_samples + 1, 2] table of (position in document_index, token offset)
//   that cuts the stream of documents (in document_index order) into seq_length + extra token samples.
// build_blending_indices: deterministic greedy assignment of blended sample i to a dataset.
// build_exhaustive_blending_indices: the same greedy rule drawing exactly sizes[d] from dataset d.
//
// Inputs are validated before any work; the loops run with the GIL released.
#include "module.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace megaphi {
namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

constexpr int64_t kPrefetchDistance = 16;

// Fills out[2 * (num_samples + 1)]. Each row is where a sample starts; sample j spans from row j to
// row j + 1 plus `extra` tokens (the label shift), so consecutive samples share that one token.
template <typename T>
void fill_sample_index(const int32_t* sizes, int64_t num_sizes, const int32_t* document_index,
                       int64_t num_documents, int32_t seq_length, int64_t num_samples,
                       int32_t extra, T* out) {
    int64_t position = 0;  // index into document_index
    int64_t offset = 0;    // token offset inside document_index[position]
    auto length_at = [&](int64_t pos) -> int64_t {
        const int32_t doc = document_index[pos];
        if (doc < 0 || doc >= num_sizes) {
            throw std::out_of_range("document_index[" + std::to_string(pos) + "] = " + std::to_string(doc) +
                                    " is outside [0, " + std::to_string(num_sizes) + ")");
        }
        return sizes[doc];
    };
    out[0] = 0;
    out[1] = 0;
    for (int64_t row = 1; row <= num_samples; ++row) {
        int64_t needed = static_cast<int64_t>(seq_length) + extra;
        while (true) {
            const int64_t available = length_at(position) - offset;
            if (needed <= available) {
                // The sample ends inside this document; the next one starts `extra` tokens earlier.
                offset += needed - extra;
                break;
            }
            needed -= available;
            if (position + 1 >= num_documents) {
                throw std::runtime_error("build_sample_index: the documents hold fewer tokens than "
                                         "num_epochs * tokens_per_epoch (inconsistent inputs)");
            }
            ++position;
            offset = 0;
            // document_index is shuffled, so sizes[] is read at random: fetch ahead to hide misses.
            if (position + kPrefetchDistance < num_documents) {
                const int32_t ahead = document_index[position + kPrefetchDistance];
                if (ahead >= 0 && ahead < num_sizes) __builtin_prefetch(sizes + ahead);
            }
        }
        out[2 * row] = static_cast<T>(position);
        out[2 * row + 1] = static_cast<T>(offset);
    }
}

py::array build_sample_index(const Int32Array& sequence_lengths, const Int32Array& document_index,
                             int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch,
                             bool add_extra_token, py::object index_dtype) {
    if (sequence_lengths.ndim() != 1 || document_index.ndim() != 1) {
        throw std::invalid_argument("sequence_lengths and document_index must be 1-D arrays");
    }
    if (seq_length <= 0 || seq_length > std::numeric_limits<int32_t>::max()) {
        throw std::invalid_argument("seq_length must be a positive int32, got " + std::to_string(seq_length));
    }
    if (num_epochs <= 0) throw std::invalid_argument("num_epochs must be >= 1, got " + std::to_string(num_epochs));
    const int32_t extra = add_extra_token ? 1 : 0;
    if (tokens_per_epoch <= extra) {
        throw std::invalid_argument("tokens_per_epoch must exceed " + std::to_string(extra) + ", got " +
                                    std::to_string(tokens_per_epoch));
    }
    const int64_t num_documents = document_index.shape(0);
    const int64_t num_sizes = sequence_lengths.shape(0);
    if (num_documents == 0) throw std::invalid_argument("document_index is empty");
    // Full samples only (Megatron's drop_last_partial_sequence=True).
    const int64_t num_samples = (num_epochs * tokens_per_epoch - extra) / seq_length;

    const int32_t* sizes_ptr = sequence_lengths.data();
    const int32_t* docs_ptr = document_index.data();

    // Megatron stores int32 unless an entry could exceed it: entries are bounded by the number of
    // document_index positions and by the longest sequence.
    bool use_int64;
    if (index_dtype.is_none()) {
        int32_t longest = 0;
        {
            py::gil_scoped_release release;
            for (int64_t i = 0; i < num_sizes; ++i) longest = std::max(longest, sizes_ptr[i]);
        }
        use_int64 = std::max<int64_t>(num_documents, longest) > std::numeric_limits<int32_t>::max();
    } else {
        const std::string name = py::str(py::dtype::from_args(index_dtype));
        if (name != "int32" && name != "int64") {
            throw std::invalid_argument("index_dtype must be int32, int64 or None, got " + name);
        }
        use_int64 = name == "int64";
    }

    if (use_int64) {
        py::array_t<int64_t> out({num_samples + 1, int64_t{2}});
        int64_t* out_ptr = out.mutable_data();
        py::gil_scoped_release release;
        fill_sample_index<int64_t>(sizes_ptr, num_sizes, docs_ptr, num_documents,
                                   static_cast<int32_t>(seq_length), num_samples, extra, out_ptr);
        return std::move(out);
    }
    py::array_t<int32_t> out({num_samples + 1, int64_t{2}});
    int32_t* out_ptr = out.mutable_data();
    py::gil_scoped_release release;
    fill_sample_index<int32_t>(sizes_ptr, num_sizes, docs_ptr, num_documents,
                               static_cast<int32_t>(seq_length), num_samples, extra, out_ptr);
    return std::move(out);
}

void check_dataset_count(int64_t n) {
    if (n < 1) throw std::invalid_argument("blending needs at least one dataset");
    if (n >= std::numeric_limits<int16_t>::max()) {
        throw std::invalid_argument("blending supports fewer than 32767 datasets, got " + std::to_string(n));
    }
}

// Sample i goes to argmax_d(w_d * max(i, 1) - count_d); ties go to the lowest d.
py::tuple build_blending_indices(const FloatArray& weights, int64_t size) {
    if (weights.ndim() != 1) throw std::invalid_argument("weights must be a 1-D array");
    const int64_t n = weights.shape(0);
    check_dataset_count(n);
    if (size < 0) throw std::invalid_argument("size must be >= 0, got " + std::to_string(size));
    const double* w = weights.data();
    for (int64_t d = 0; d < n; ++d) {
        if (!(w[d] > 0.0) || !std::isfinite(w[d])) {
            throw std::invalid_argument("blending weight " + std::to_string(d) + " must be finite and > 0");
        }
    }
    py::array_t<int16_t> dataset_index(size);
    py::array_t<int64_t> dataset_sample_index(size);
    int16_t* di = dataset_index.mutable_data();
    int64_t* dsi = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<int64_t> counts(static_cast<size_t>(n), 0);
        for (int64_t i = 0; i < size; ++i) {
            const double scale = std::max(static_cast<double>(i), 1.0);
            int64_t best = 0;
            double best_error = w[0] * scale - static_cast<double>(counts[0]);
            for (int64_t d = 1; d < n; ++d) {
                const double error = w[d] * scale - static_cast<double>(counts[d]);
                if (error > best_error) {
                    best_error = error;
                    best = d;
                }
            }
            di[i] = static_cast<int16_t>(best);
            dsi[i] = counts[best]++;
        }
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

// Draws exactly sizes[d] samples from dataset d, interleaved by the same greedy rule with
// weights sizes / sum(sizes); an exhausted dataset leaves the competition.
py::tuple build_exhaustive_blending_indices(const Int64Array& sizes) {
    if (sizes.ndim() != 1) throw std::invalid_argument("sizes must be a 1-D array");
    const int64_t n = sizes.shape(0);
    check_dataset_count(n);
    const int64_t* s = sizes.data();
    int64_t total = 0;
    for (int64_t d = 0; d < n; ++d) {
        if (s[d] < 0) throw std::invalid_argument("sizes must be >= 0");
        total += s[d];
    }
    py::array_t<int16_t> dataset_index(total);
    py::array_t<int64_t> dataset_sample_index(total);
    int16_t* di = dataset_index.mutable_data();
    int64_t* dsi = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<double> w(static_cast<size_t>(n));
        std::vector<int64_t> counts(static_cast<size_t>(n), 0);
        for (int64_t d = 0; d < n; ++d) w[d] = static_cast<double>(s[d]) / static_cast<double>(total);
        for (int64_t i = 0; i < total; ++i) {
            const double scale = std::max(static_cast<double>(i), 1.0);
            int64_t best = -1;
            double best_error = std::numeric_limits<double>::lowest();
            for (int64_t d = 0; d < n; ++d) {
                if (counts[d] == s[d]) continue;
                const double error = w[d] * scale - static_cast<double>(counts[d]);
                if (error > best_error) {
                    best_error = error;
                    best = d;
                }
            }
            di[i] = static_cast<int16_t>(best);
            dsi[i] = counts[best]++;
        }
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

void register_index_builders(pybind11::module_& m) {
    m.def("build_sample_index", &build_sample_index, py::arg("sequence_lengths"), py::arg("document_index"),
          py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
          py::arg("add_extra_token") = true, py::arg("index_dtype") = py::none(),
          "Sample index [num_samples + 1, 2] (document_index position, token offset) with Megatron's "
          "build_sample_idx semantics (full samples only). index_dtype None picks int32 unless "
          "max(len(document_index), max(sequence_lengths)) exceeds it.");
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
          "(dataset_index int16[size], dataset_sample_index int64[size]) by the greedy rule "
          "argmax_d(w_d * max(i, 1) - count_d), ties to the lowest d.");
    m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices, py::arg("sizes"),
          "Blending indices drawing exactly sizes[d] samples from dataset d.");
}

}  // namespace megaphi
