// Streaming writer for Megatron-LM MMIDIDX v1 token files (.bin + .idx), see docs/design.md.
//
// Tokens are converted to the output dtype (with a range check on every token) and written to the
// .bin through a fixed-size buffer as they arrive; only the per-sequence lengths (int32) and the
// document boundaries (int64) are kept, in C++ vectors. finalize() computes the int64 byte offsets
// while it writes the .idx, so more than 2^31 tokens / bytes are fine. The GIL is released while
// tokens are converted and written. One builder must not be used from several threads at once.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "module.h"

namespace py = pybind11;

namespace megaphi {
namespace {

// Raised as OSError in Python (registered below).
struct IOFailure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// MMIDIDX dtype codes.
enum DtypeCode : uint8_t { U8 = 1, I8 = 2, I16 = 3, I32 = 4, I64 = 5, F64 = 6, F32 = 7, U16 = 8 };

const char* code_name(int code) {
    switch (code) {
        case U8: return "uint8";
        case I8: return "int8";
        case I16: return "int16";
        case I32: return "int32";
        case I64: return "int64";
        case U16: return "uint16";
        case F64: return "float64";
        case F32: return "float32";
        default: return "unknown";
    }
}

int code_itemsize(int code) {
    switch (code) {
        case U8: case I8: return 1;
        case I16: case U16: return 2;
        case I32: case F32: return 4;
        case I64: case F64: return 8;
        default: return 0;
    }
}

// Does every value of In fit in Out? (then no per-token check is needed)
template <typename In, typename Out>
constexpr bool always_fits() {
    using LI = std::numeric_limits<In>;
    using LO = std::numeric_limits<Out>;
    if (std::is_signed<In>::value && !std::is_signed<Out>::value) return false;
    if (std::is_signed<In>::value) return LI::digits <= LO::digits;     // both signed
    if (std::is_signed<Out>::value) return LI::digits <= LO::digits;    // unsigned -> signed
    return LI::digits <= LO::digits;                                    // both unsigned
}

template <typename In, typename Out>
inline bool fits(In v) {
    if constexpr (always_fits<In, Out>()) {
        (void)v;
        return true;
    } else if constexpr (std::is_signed<In>::value) {
        const int64_t w = static_cast<int64_t>(v);
        if constexpr (std::is_signed<Out>::value) {
            return w >= static_cast<int64_t>(std::numeric_limits<Out>::min()) &&
                   w <= static_cast<int64_t>(std::numeric_limits<Out>::max());
        } else {
            return w >= 0 && static_cast<uint64_t>(w) <= static_cast<uint64_t>(std::numeric_limits<Out>::max());
        }
    } else {
        return static_cast<uint64_t>(v) <= static_cast<uint64_t>(std::numeric_limits<Out>::max());
    }
}

class DatasetBuilder {
  public:
    DatasetBuilder(std::string bin_path, int dtype_code, int64_t buffer_bytes)
        : bin_path_(std::move(bin_path)), code_(dtype_code) {
        itemsize_ = code_itemsize(code_);
        if (itemsize_ == 0 || code_ == F32 || code_ == F64)
            throw std::invalid_argument("IndexedDatasetBuilder: unsupported token dtype code " + std::to_string(code_) +
                                        " (integer codes 1-5 and 8 are supported)");
        if (buffer_bytes < 4096) buffer_bytes = 4096;
        buffer_.resize(static_cast<size_t>(buffer_bytes));
        bin_ = std::fopen(bin_path_.c_str(), "wb");
        if (!bin_) throw IOFailure("cannot open " + bin_path_ + " for writing: " + std::strerror(errno));
        document_indices_.push_back(0);
    }

    ~DatasetBuilder() { close_bin(); }

    // Appends sequences: tokens is a 1-D integer array holding them back to back, lengths their sizes.
    // doc_ends (optional) lists, for each document completed by this call, the number of sequences of
    // this call after which it ends (values in 1..n, increasing). `documents` = true ends a document
    // after every sequence (the usual case: one sequence per document).
    void add(py::array tokens, py::object lengths_obj, py::object doc_ends_obj, bool documents) {
        check_open("add");
        if (tokens.ndim() != 1)
            throw std::invalid_argument("IndexedDatasetBuilder: token array must be 1-D, got " +
                                        std::to_string(tokens.ndim()) + "-D");
        const char kind = tokens.dtype().kind();
        if (kind != 'i' && kind != 'u')
            throw py::type_error("IndexedDatasetBuilder: token array must have an integer dtype, got " +
                                 std::string(py::str(tokens.dtype())));
        tokens = py::array::ensure(tokens, py::array::c_style);
        const int64_t total = static_cast<int64_t>(tokens.size());

        std::vector<int64_t> lengths;
        if (lengths_obj.is_none()) {
            lengths.push_back(total);
        } else {
            auto la = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(lengths_obj);
            if (!la || la.ndim() != 1) throw std::invalid_argument("IndexedDatasetBuilder: lengths must be a 1-D integer array");
            lengths.assign(la.data(), la.data() + la.size());
        }
        int64_t sum = 0;
        for (size_t j = 0; j < lengths.size(); ++j) {
            if (lengths[j] < 0 || lengths[j] > std::numeric_limits<int32_t>::max())
                throw std::invalid_argument("IndexedDatasetBuilder: length " + std::to_string(lengths[j]) + " of document " +
                                            std::to_string(num_documents() + static_cast<int64_t>(j)) +
                                            " is out of range (0..2^31-1 tokens per sequence)");
            sum += lengths[j];
        }
        if (sum != total)
            throw std::invalid_argument("IndexedDatasetBuilder: lengths sum to " + std::to_string(sum) +
                                        " but the token array has " + std::to_string(total) + " tokens");
        std::vector<int64_t> ends;
        if (!doc_ends_obj.is_none()) {
            auto ea = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(doc_ends_obj);
            if (!ea || ea.ndim() != 1) throw std::invalid_argument("IndexedDatasetBuilder: doc_ends must be a 1-D integer array");
            ends.assign(ea.data(), ea.data() + ea.size());
            int64_t prev = 0;
            for (int64_t e : ends) {
                if (e <= prev || e > static_cast<int64_t>(lengths.size()))
                    throw std::invalid_argument("IndexedDatasetBuilder: doc_ends must be increasing values in 1..len(lengths)");
                prev = e;
            }
        }

        const int in_size = static_cast<int>(tokens.itemsize());
        const void* src = tokens.data();
        int64_t bad_pos = -1;
        {
            py::gil_scoped_release release;
            bad_pos = write_tokens(src, kind, in_size, total);
        }
        if (bad_pos >= 0) {
            // Locate the sequence holding the bad token, for the message; nothing was recorded.
            int64_t acc = 0;
            size_t j = 0;
            while (j < lengths.size() && acc + lengths[j] <= bad_pos) acc += lengths[j++];
            const std::string value = std::string(py::str(tokens.attr("__getitem__")(py::int_(bad_pos))));
            throw std::overflow_error("IndexedDatasetBuilder: token id " + value + " at position " +
                                      std::to_string(bad_pos - acc) + " of document " +
                                      std::to_string(num_documents() + static_cast<int64_t>(j)) + " does not fit " +
                                      code_name(code_) + " (vocabulary too large for this dtype?)");
        }
        size_t next_end = 0;
        for (size_t j = 0; j < lengths.size(); ++j) {
            lengths_.push_back(static_cast<int32_t>(lengths[j]));
            if (documents || (next_end < ends.size() && ends[next_end] == static_cast<int64_t>(j + 1))) {
                document_indices_.push_back(static_cast<int64_t>(lengths_.size()));
                if (!documents) ++next_end;
            }
        }
        num_tokens_ += total;
    }

    void end_document() {
        check_open("end_document");
        if (document_indices_.back() != static_cast<int64_t>(lengths_.size()))
            document_indices_.push_back(static_cast<int64_t>(lengths_.size()));
    }

    void finalize(const std::string& idx_path) {
        check_open("finalize");
        end_document();  // a trailing run of sequences forms the last document
        {
            py::gil_scoped_release release;
            flush();
            close_bin_checked();
            write_index(idx_path);
        }
        finalized_ = true;
    }

    // Closes the .bin without writing an index (the caller removes the partial file).
    void close() {
        failed_ = true;
        close_bin();
    }

    int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
    int64_t num_documents() const { return static_cast<int64_t>(document_indices_.size()) - 1; }
    int64_t num_tokens() const { return num_tokens_; }
    int64_t bytes_written() const { return num_tokens_ * itemsize_; }
    int dtype_code() const { return code_; }
    const std::string& bin_path() const { return bin_path_; }
    bool finalized() const { return finalized_; }

  private:
    void check_open(const char* what) const {
        if (finalized_) throw std::runtime_error(std::string("IndexedDatasetBuilder.") + what + ": already finalized");
        if (failed_ || !bin_)
            throw std::runtime_error(std::string("IndexedDatasetBuilder.") + what + ": builder for " + bin_path_ +
                                     " was closed after an error");
    }

    void close_bin() {
        if (bin_) {
            std::fclose(bin_);
            bin_ = nullptr;
        }
    }

    void close_bin_checked() {
        FILE* f = bin_;
        bin_ = nullptr;
        if (f && std::fclose(f) != 0) throw IOFailure("error closing " + bin_path_ + ": " + std::strerror(errno));
    }

    void flush() {
        if (fill_ == 0) return;
        if (std::fwrite(buffer_.data(), 1, fill_, bin_) != fill_) {
            const int err = errno;
            close_bin();
            failed_ = true;
            throw IOFailure("error writing " + bin_path_ + ": " + std::strerror(err));
        }
        fill_ = 0;
    }

    // Converts and buffers n tokens; returns the position of the first token that does not fit
    // (nothing of this call is then written: the builder stays usable), or -1. Runs without the GIL.
    int64_t write_tokens(const void* src, char kind, int in_size, int64_t n) {
        // Range-check everything first, so that a bad token leaves no partial document in the file.
        const int64_t bad = dispatch_in(src, kind, in_size, n, /*check_only=*/true);
        if (bad >= 0) return bad;
        dispatch_in(src, kind, in_size, n, /*check_only=*/false);
        return -1;
    }

    int64_t dispatch_in(const void* src, char kind, int in_size, int64_t n, bool check_only) {
        if (kind == 'i') {
            switch (in_size) {
                case 1: return dispatch_out(static_cast<const int8_t*>(src), n, check_only);
                case 2: return dispatch_out(static_cast<const int16_t*>(src), n, check_only);
                case 4: return dispatch_out(static_cast<const int32_t*>(src), n, check_only);
                case 8: return dispatch_out(static_cast<const int64_t*>(src), n, check_only);
            }
        } else {
            switch (in_size) {
                case 1: return dispatch_out(static_cast<const uint8_t*>(src), n, check_only);
                case 2: return dispatch_out(static_cast<const uint16_t*>(src), n, check_only);
                case 4: return dispatch_out(static_cast<const uint32_t*>(src), n, check_only);
                case 8: return dispatch_out(static_cast<const uint64_t*>(src), n, check_only);
            }
        }
        throw std::invalid_argument("IndexedDatasetBuilder: unsupported input itemsize " + std::to_string(in_size));
    }

    template <typename In>
    int64_t dispatch_out(const In* src, int64_t n, bool check_only) {
        switch (code_) {
            case U8: return convert<In, uint8_t>(src, n, check_only);
            case I8: return convert<In, int8_t>(src, n, check_only);
            case I16: return convert<In, int16_t>(src, n, check_only);
            case I32: return convert<In, int32_t>(src, n, check_only);
            case I64: return convert<In, int64_t>(src, n, check_only);
            case U16: return convert<In, uint16_t>(src, n, check_only);
        }
        return -1;
    }

    template <typename In, typename Out>
    int64_t convert(const In* src, int64_t n, bool check_only) {
        if (check_only) {
            if constexpr (!always_fits<In, Out>()) {
                for (int64_t i = 0; i < n; ++i)
                    if (!fits<In, Out>(src[i])) return i;
            }
            return -1;
        }
        const size_t per_chunk = buffer_.size() / sizeof(Out);
        int64_t done = 0;
        while (done < n) {
            size_t room = (buffer_.size() - fill_) / sizeof(Out);
            if (room == 0) {
                flush();
                room = per_chunk;
            }
            const int64_t m = std::min<int64_t>(static_cast<int64_t>(room), n - done);
            char* dst = buffer_.data() + fill_;
            if constexpr (std::is_same<In, Out>::value) {
                std::memcpy(dst, src + done, static_cast<size_t>(m) * sizeof(Out));
            } else {
                Out tmp;
                for (int64_t i = 0; i < m; ++i) {
                    tmp = static_cast<Out>(src[done + i]);
                    std::memcpy(dst + i * sizeof(Out), &tmp, sizeof(Out));
                }
            }
            fill_ += static_cast<size_t>(m) * sizeof(Out);
            done += m;
        }
        return -1;
    }

    void write_index(const std::string& idx_path) {
        FILE* f = std::fopen(idx_path.c_str(), "wb");
        if (!f) throw IOFailure("cannot open " + idx_path + " for writing: " + std::strerror(errno));
        bool ok = true;
        auto put = [&](const void* p, size_t n) {
            if (ok && n && std::fwrite(p, 1, n, f) != n) ok = false;
        };
        const char magic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
        const uint64_t version = 1;
        const uint8_t code = static_cast<uint8_t>(code_);
        const uint64_t s = lengths_.size();
        const uint64_t d = document_indices_.size();
        put(magic, 9);
        put(&version, 8);  // little-endian host (x86-64 / aarch64)
        put(&code, 1);
        put(&s, 8);
        put(&d, 8);
        put(lengths_.data(), lengths_.size() * sizeof(int32_t));
        // Byte offsets: exclusive cumulative sum of length * itemsize, computed in chunks.
        std::vector<int64_t> chunk(std::min<size_t>(lengths_.size(), 1 << 16));
        int64_t offset = 0;
        for (size_t start = 0; start < lengths_.size(); start += chunk.size()) {
            const size_t m = std::min(chunk.size(), lengths_.size() - start);
            for (size_t i = 0; i < m; ++i) {
                chunk[i] = offset;
                offset += static_cast<int64_t>(lengths_[start + i]) * itemsize_;
            }
            put(chunk.data(), m * sizeof(int64_t));
        }
        put(document_indices_.data(), document_indices_.size() * sizeof(int64_t));
        const int err = errno;
        if (std::fclose(f) != 0) ok = false;
        if (!ok) throw IOFailure("error writing " + idx_path + ": " + std::strerror(err ? err : errno));
    }

    std::string bin_path_;
    int code_;
    int itemsize_ = 0;
    FILE* bin_ = nullptr;
    std::vector<char> buffer_;
    size_t fill_ = 0;
    std::vector<int32_t> lengths_;
    std::vector<int64_t> document_indices_;
    int64_t num_tokens_ = 0;
    bool finalized_ = false;
    bool failed_ = false;
};

}  // namespace

void register_builder(py::module_& m) {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const IOFailure& e) {
            PyErr_SetString(PyExc_OSError, e.what());
        }
    });

    py::class_<DatasetBuilder>(m, "DatasetBuilder", R"doc(
Streaming writer of a Megatron MMIDIDX v1 token file pair (.bin/.idx).

DatasetBuilder(bin_path, dtype_code, buffer_bytes=8 MiB): opens (truncates) bin_path. dtype_code is
the MMIDIDX code of the token dtype (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 8 u16). Use
megaphi.data.indexed_dataset.IndexedDatasetBuilder rather than this class directly.)doc")
        .def(py::init<std::string, int, int64_t>(), py::arg("bin_path"), py::arg("dtype_code"),
             py::arg("buffer_bytes") = int64_t(8) << 20)
        .def(
            "add_document",
            [](DatasetBuilder& b, py::array tokens) { b.add(tokens, py::none(), py::none(), true); },
            py::arg("tokens"), "Appends one document (one sequence) from a 1-D integer array.")
        .def(
            "add_documents",
            [](DatasetBuilder& b, py::array tokens, py::object lengths) { b.add(tokens, lengths, py::none(), true); },
            py::arg("tokens"), py::arg("lengths"),
            "Appends len(lengths) documents, one sequence each, whose tokens are concatenated in `tokens`.")
        .def(
            "add_sequences",
            [](DatasetBuilder& b, py::array tokens, py::object lengths, py::object doc_ends) {
                b.add(tokens, lengths, doc_ends, false);
            },
            py::arg("tokens"), py::arg("lengths"), py::arg("doc_ends") = py::none(),
            "Appends sequences without ending documents, except after the sequence counts listed in doc_ends.")
        .def("end_document", &DatasetBuilder::end_document)
        .def("finalize", &DatasetBuilder::finalize, py::arg("idx_path"),
             "Flushes and closes the .bin, then writes the .idx.")
        .def("close", &DatasetBuilder::close, "Closes the .bin without writing an index.")
        .def_property_readonly("num_sequences", &DatasetBuilder::num_sequences)
        .def_property_readonly("num_documents", &DatasetBuilder::num_documents)
        .def_property_readonly("num_tokens", &DatasetBuilder::num_tokens)
        .def_property_readonly("bytes_written", &DatasetBuilder::bytes_written)
        .def_property_readonly("dtype_code", &DatasetBuilder::dtype_code)
        .def_property_readonly("bin_path", &DatasetBuilder::bin_path)
        .def_property_readonly("finalized", &DatasetBuilder::finalized);
}

}  // namespace megaphi
