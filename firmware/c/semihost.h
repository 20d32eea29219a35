/*
 * ARM semihosting (the "bkpt 0xAB" calls QEMU answers with -semihosting-config enable=on): the
 * console, exit with a status, the command line and host file I/O of the QEMU images. Shared by
 * board_mps2.c, board_microbit.c and startup.c; on a part without a debugger attached these calls
 * fault, so only the emulated boards use them.
 */
#ifndef SEMIHOST_H
#define SEMIHOST_H

#include <stddef.h>
#include <stdint.h>

/* File modes of SH_OPEN (the ISO C fopen modes, in the order the semihosting spec numbers them). */
#define SH_MODE_RB 1
#define SH_MODE_R_PLUS_B 3

/* Write a NUL-terminated string to the debug console. */
void sh_write0(const char *text);

/* End the emulation with an exit status (SYS_EXIT_EXTENDED: QEMU exits with exactly this code). */
void sh_exit(int code) __attribute__((noreturn));

/* Copy the semihosting command line (-semihosting-config arg=...) into buf, NUL-terminated.
 * Returns its length, or -1 when the host has none or it does not fit. */
int sh_get_cmdline(char *buf, size_t size);

/* Host files: a handle >= 0, or -1. */
int sh_open(const char *path, int mode);
/* 0 on success, -1 on failure. */
int sh_seek(int handle, uint32_t position);
/* 0 when all len bytes were written, -1 otherwise. */
int sh_write(int handle, const uint8_t *data, size_t len);
int sh_close(int handle);

#endif /* SEMIHOST_H */
