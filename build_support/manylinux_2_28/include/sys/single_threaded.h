/* Stands in for glibc's <sys/single_threaded.h> (glibc >= 2.32) when building release wheels.
 *
 * libstdc++ (GCC >= 11) reads glibc's `__libc_single_threaded` flag in its inline reference-count
 * code whenever this header exists, which makes every extension built on a newer glibc import
 * `__libc_single_threaded@GLIBC_2.32`: it then fails to load on glibc 2.28 (manylinux_2_28, RHEL 8).
 * This header, found first on the include path, keeps the header present for libstdc++ but answers
 * "not single-threaded" from a constant of this translation unit: reference counts always use
 * atomics, as they do on glibc < 2.32 once a thread exists. No symbol is imported. */
#ifndef LINEARPATCH_SYS_SINGLE_THREADED_H
#define LINEARPATCH_SYS_SINGLE_THREADED_H

#define __libc_single_threaded linearpatch_libc_single_threaded
static const char linearpatch_libc_single_threaded = 0;

#endif
