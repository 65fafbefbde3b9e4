// Where a kernel's `__shared__` variables are. In this runtime `__shared__` means `static`, so they are
// the kernel function's static locals, and the symbol table of the file that holds the kernel lists
// them: g++ names a static local `v` of function `_Z<F>` as `_ZZ<F>E<v>`. The scheduler gives each
// block its own copy of them (swapped in whenever that block's threads run) and charges their size
// against the 48 KiB shared-memory limit of a block, as a GPU does.
#pragma once

#include <dlfcn.h>
#include <elf.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace megaphi_fiber {

struct SharedVariable {
    unsigned char* address;
    std::size_t bytes;
};

struct StaticShared {
    std::vector<SharedVariable> variables;
    std::size_t bytes = 0;
};

[[noreturn]] inline void symbol_lookup_failed(const char* file, const char* why) {
    std::fprintf(stderr, "megaphi fiber runtime: cannot find a launched kernel's __shared__ variables in %s: %s\n",
                 file, why);
    std::abort();
}

// Function and object symbols of one ELF file, addresses as loaded.
struct Symbols {
    std::map<std::uintptr_t, std::string> functions;
    std::vector<std::pair<std::string, SharedVariable>> objects;
};

inline Symbols read_symbols(const char* file, std::uintptr_t load_base) {
    std::ifstream in(file, std::ios::binary);
    const std::vector<char> image((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (image.size() < sizeof(Elf64_Ehdr) || std::memcmp(image.data(), ELFMAG, SELFMAG) != 0 ||
        image[EI_CLASS] != ELFCLASS64) {
        symbol_lookup_failed(file, "not a 64-bit ELF file");
    }
    const auto* header = reinterpret_cast<const Elf64_Ehdr*>(image.data());
    const std::uintptr_t base = header->e_type == ET_DYN ? load_base : 0;
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image.data() + header->e_shoff);
    Symbols symbols;
    bool found_table = false;
    for (unsigned s = 0; s < header->e_shnum; ++s) {
        if (sections[s].sh_type != SHT_SYMTAB) continue;
        found_table = true;
        const char* names = image.data() + sections[sections[s].sh_link].sh_offset;
        const auto* entries = reinterpret_cast<const Elf64_Sym*>(image.data() + sections[s].sh_offset);
        for (std::size_t i = 0; i < sections[s].sh_size / sizeof(Elf64_Sym); ++i) {
            const Elf64_Sym& sym = entries[i];
            const std::uintptr_t address = base + sym.st_value;
            if (ELF64_ST_TYPE(sym.st_info) == STT_FUNC) {
                symbols.functions.emplace(address, names + sym.st_name);
            } else if (ELF64_ST_TYPE(sym.st_info) == STT_OBJECT && std::strncmp(names + sym.st_name, "_ZZ", 3) == 0) {
                symbols.objects.push_back({names + sym.st_name,
                                           SharedVariable{reinterpret_cast<unsigned char*>(address), sym.st_size}});
            }
        }
    }
    if (!found_table) symbol_lookup_failed(file, "no symbol table (stripped?)");
    return symbols;
}

inline const StaticShared& static_shared_of(const void* kernel) {
    static std::map<const void*, StaticShared> by_kernel;
    static std::map<std::string, Symbols> by_file;
    const auto known = by_kernel.find(kernel);
    if (known != by_kernel.end()) return known->second;
    Dl_info info;
    if (dladdr(kernel, &info) == 0 || info.dli_fname == nullptr) symbol_lookup_failed("?", "dladdr failed");
    auto file = by_file.find(info.dli_fname);
    if (file == by_file.end()) {
        file = by_file.emplace(info.dli_fname,
                               read_symbols(info.dli_fname, reinterpret_cast<std::uintptr_t>(info.dli_fbase))).first;
    }
    const auto function = file->second.functions.find(reinterpret_cast<std::uintptr_t>(kernel));
    if (function == file->second.functions.end()) {
        symbol_lookup_failed(info.dli_fname, "no symbol at the kernel's address");
    }
    if (function->second.compare(0, 2, "_Z") != 0) symbol_lookup_failed(info.dli_fname, "kernel name is not mangled");
    const std::string prefix = "_ZZ" + function->second.substr(2) + "E";
    StaticShared shared;
    for (const auto& [name, variable] : file->second.objects) {
        if (name.compare(0, prefix.size(), prefix) != 0) continue;
        shared.variables.push_back(variable);
        shared.bytes += variable.bytes;
    }
    return by_kernel.emplace(kernel, shared).first->second;
}

}  // namespace megaphi_fiber
