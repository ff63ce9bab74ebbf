"""Large CPU blocks mapped once and reused: a caching allocator for PyTorch's CPU tensors while training (issue 7).

PyTorch's CPU allocator is glibc's ``malloc``. With :func:`clintune.fast.reuse_freed_memory` large blocks stay
in glibc's heap for reuse (mapping them afresh faults every page in again: 15-25% of a LoRA step), but small
blocks that live long (oneDNN's kernels, built for each new product shape, and the optimiser's state, both made
while training) land between the temporaries and keep the holes above them: measured on LoRA MiniLM at 4,096-token
micro-batches, some 170 MB of a 1.2 GB peak RSS (``benchmarks/README.md``, "Training's saved tensors in one
reused buffer"). PyTorch offers caching allocators only for CUDA and mobile builds, so this is one of clintune's
own, about 80 lines of C++ compiled on first use against PyTorch's headers (as :mod:`clintune.masks` compiles
its kernels) and registered with ``c10::SetCPUAllocator``:

* blocks of ``min_block`` bytes or more (1 MiB) are mapped with ``mmap`` in multiples of 64 KiB, and on free
  kept by size; a request takes the smallest kept block that holds it and is at most ``fit`` (4) times its
  size, else a new mapping;
* at most ``limit`` bytes (128 MiB) are kept free; a block freed beyond that is unmapped at once;
* smaller blocks go to the allocator that was there before (glibc), untouched.

Each large block is its own mapping, so a freed one never splits a region the next request needs: the holes go.
:func:`install` on training's start (:func:`clintune.fast.accelerate`), :func:`uninstall` after it
(:meth:`clintune.fast.Speedups.restore`), which unmaps what is kept; blocks still alive then are unmapped when
freed. Where no C++ compiler or PyTorch headers are found (or ``CLINTUNE_NO_KERNELS`` is set) nothing changes.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
from pathlib import Path

import torch

MIN_BLOCK = 1 << 20
FIT = 4.0
LIMIT = 128 << 20

_SOURCE = r"""
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {
constexpr size_t kGrain = size_t(1) << 16;

class BlockCache final : public c10::Allocator {
 public:
  c10::Allocator* base = nullptr;             // the allocator before (glibc's malloc): small blocks, and restored
  size_t min_block = 0, limit = 0;
  double fit = 1.0;
  std::atomic<bool> caching{false};
  double stats[6] = {0, 0, 0, 0, 0, 0};       // mapped, peak mapped, kept free, mappings made, reuses, unmapped

  c10::DataPtr allocate(size_t n) override {
    if (n < min_block || !caching) return base->allocate(n);
    size_t size = (n + kGrain - 1) / kGrain * kGrain;
    void* p = take(size);
    if (p == nullptr) {                       // mapped outside the lock, then counted and registered under it
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return base->allocate(n);
      std::lock_guard<std::mutex> g(m_);
      stats[0] += size;
      stats[3] += 1;
      if (stats[0] > stats[1]) stats[1] = stats[0];
      live_[p] = size;
    }
    return {p, p, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static void release(void* p);
  void put(void* p) {
    std::unique_lock<std::mutex> g(m_);
    auto it = live_.find(p);
    if (it == live_.end()) {                  // not one of ours: a raw_deallocate of the base's block
      g.unlock();
      if (base->raw_deleter() != nullptr) base->raw_deleter()(p);
      return;
    }
    size_t size = it->second;
    live_.erase(it);
    if (caching && stats[2] + size <= double(limit)) {
      free_.emplace(size, p);
      stats[2] += size;
      return;
    }
    munmap(p, size);
    stats[0] -= size;
    stats[5] += 1;
  }
  void read_stats(double* out) {
    std::lock_guard<std::mutex> g(m_);
    std::memcpy(out, stats, sizeof stats);
  }
  void trim() {
    std::lock_guard<std::mutex> g(m_);
    for (auto& kv : free_) {
      munmap(kv.second, kv.first);
      stats[0] -= kv.first;
      stats[5] += 1;
    }
    free_.clear();
    stats[2] = 0;
  }

 private:
  // the smallest kept block that holds size bytes and is at most fit times it, registered as live (size: its
  // own); nullptr if none
  void* take(size_t& size) {
    std::lock_guard<std::mutex> g(m_);
    auto it = free_.lower_bound(size);
    if (it == free_.end() || double(it->first) > double(size) * fit) return nullptr;
    size = it->first;
    void* p = it->second;
    free_.erase(it);
    stats[2] -= size;
    stats[4] += 1;
    live_[p] = size;
    return p;
  }
  std::mutex m_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> live_;
};

BlockCache* cache = nullptr;                  // never deleted: blocks may outlive uninstall
void BlockCache::release(void* p) { cache->put(p); }
}  // namespace

extern "C" int clintune_blocks_install(size_t min_block, double fit, size_t limit) {
  if (cache == nullptr) {
    cache = new BlockCache();
    cache->base = c10::GetCPUAllocator();
  }
  if (cache->caching) return 0;
  cache->min_block = min_block;
  cache->fit = fit;
  cache->limit = limit;
  cache->caching = true;
  c10::SetCPUAllocator(cache, 100);
  return 1;
}

extern "C" int clintune_blocks_uninstall() {
  if (cache == nullptr || !cache->caching) return 0;
  cache->caching = false;
  c10::SetCPUAllocator(cache->base, 100);
  cache->trim();
  return 1;
}

extern "C" void clintune_blocks_stats(double* out) {
  if (cache != nullptr) cache->read_stats(out);
}
"""

_LIB: list = []


def _compile() -> ctypes.CDLL | None:
    from .masks import _cache_dir, build_library

    if os.environ.get("CLINTUNE_NO_KERNELS") or os.name != "posix":
        return None
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    root = Path(torch.__file__).resolve().parent
    include, lib = root / "include", root / "lib"
    if cxx is None or not (include / "c10" / "core" / "CPUAllocator.h").exists():
        return None
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}"]
    libs = [f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"]
    key = hashlib.sha256("\n".join([_SOURCE, cxx, torch.__version__, str(root), *flags]).encode()).hexdigest()[:16]
    out = build_library(_cache_dir() / f"blocks-{key}.so", "blocks.cpp", _SOURCE,
                        [[cxx, *flags, "{src}", "-o", "{obj}", *libs]])     # -lc10 after the source, or it is dropped
    if out is None:
        return None
    out.clintune_blocks_install.argtypes = [ctypes.c_size_t, ctypes.c_double, ctypes.c_size_t]
    out.clintune_blocks_install.restype = ctypes.c_int
    out.clintune_blocks_uninstall.restype = ctypes.c_int
    out.clintune_blocks_stats.argtypes = [ctypes.c_void_p]
    out.clintune_blocks_stats.restype = None
    return out


def compiled() -> ctypes.CDLL | None:
    """The compiled block cache, or None where it cannot be built."""
    if not _LIB:
        _LIB.append(_compile())
    return _LIB[0]


def install(min_block: int = MIN_BLOCK, fit: float = FIT, limit: int = LIMIT) -> bool:
    """Serve CPU blocks of ``min_block`` bytes or more from the cache, process-wide, until :func:`uninstall`.
    False where it is not compiled or already installed."""
    lib = compiled()
    return lib is not None and bool(lib.clintune_blocks_install(int(min_block), float(fit), int(limit)))


def uninstall() -> bool:
    """Back to the allocator before; what the cache keeps is unmapped (blocks still in use, when freed)."""
    lib = compiled() if _LIB else None
    return lib is not None and bool(lib.clintune_blocks_uninstall())


def stats() -> dict:
    """MB mapped now and at most, MB kept free now, mappings made, requests served from kept blocks, unmappings."""
    lib = compiled() if _LIB else None
    out = (ctypes.c_double * 6)()
    if lib is not None:
        lib.clintune_blocks_stats(out)
    mb = 2 ** 20
    return {"mapped_mb": round(out[0] / mb, 1), "peak_mapped_mb": round(out[1] / mb, 1),
            "kept_mb": round(out[2] / mb, 1), "mappings": int(out[3]), "reused": int(out[4]),
            "unmapped": int(out[5])}
