// Registers a kernel file's entry points with the driver: build.sh appends one `EMU_REGISTER(name)` per
// `extern "C" __global__` function to the kernel file it compiles.
#pragma once
#include <tuple>
#include <type_traits>
#include <utility>
#include "emu.h"

namespace emu {
template <class... A>
struct Call {
    using Args = std::tuple<std::decay_t<A>...>;
    template <size_t... I>
    static void* capture_each(void** params, std::index_sequence<I...>) {
        return new Args(*static_cast<std::decay_t<A>*>(params[I])...);
    }
    static void* capture(void** params) { return capture_each(params, std::index_sequence_for<A...>{}); }
    static void run(void* function, void* args) {
        std::apply(reinterpret_cast<void (*)(A...)>(function), *static_cast<Args*>(args));
    }
    static void release(void* args) { delete static_cast<Args*>(args); }
};

template <class... A>
int register_kernel(const char* name, void (*function)(A...)) {
    add_kernel({name, reinterpret_cast<void*>(function), &Call<A...>::capture, &Call<A...>::run, &Call<A...>::release});
    return 0;
}
}  // namespace emu

#define EMU_REGISTER(name) static const int emu_registered_##name = emu::register_kernel(#name, &name);
