# CMake toolchain for 64-bit ARM Linux from an x86-64 Debian/Ubuntu host (apt: g++-aarch64-linux-gnu).
# Used by tools/build/build_llama_static.sh for the linux-aarch64 target; the ARM feature level is set there
# (GGML_CPU_ARM_ARCH), not here, so one toolchain serves any -march.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# libraries and headers come from the cross sysroot only, programs (cmake's helpers) from the host
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
