/* ARM semihosting calls; see semihost.h. Operation numbers from the Arm semihosting spec v2. */
#include "semihost.h"

#include <string.h>

#define SYS_OPEN 0x01u
#define SYS_CLOSE 0x02u
#define SYS_WRITE0 0x04u
#define SYS_WRITE 0x05u
#define SYS_SEEK 0x0Au
#define SYS_GET_CMDLINE 0x15u
#define SYS_EXIT_EXTENDED 0x20u
#define ADP_STOPPED_APPLICATION_EXIT 0x20026u

/* r0 = operation, r1 = argument (usually a parameter block); the host's result comes back in r0. */
static int32_t sh_call(uint32_t operation, const void *argument) {
    register uint32_t r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = argument;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return (int32_t)r0;
}

void sh_write0(const char *text) { (void)sh_call(SYS_WRITE0, text); }

void sh_exit(int code) {
    const uint32_t block[2] = {ADP_STOPPED_APPLICATION_EXIT, (uint32_t)code};
    (void)sh_call(SYS_EXIT_EXTENDED, block);
    for (;;) { /* the host does not return from SYS_EXIT_EXTENDED */
    }
}

int sh_get_cmdline(char *buf, size_t size) {
    uint32_t block[2] = {(uint32_t)(uintptr_t)buf, (uint32_t)size};
    if (buf == NULL || size == 0u) return -1;
    if (sh_call(SYS_GET_CMDLINE, block) != 0) return -1;
    buf[size - 1u] = '\0';
    return (int)block[1];
}

int sh_open(const char *path, int mode) {
    const uint32_t block[3] = {(uint32_t)(uintptr_t)path, (uint32_t)mode, (uint32_t)strlen(path)};
    return (int)sh_call(SYS_OPEN, block);
}

int sh_seek(int handle, uint32_t position) {
    const uint32_t block[2] = {(uint32_t)handle, position};
    return sh_call(SYS_SEEK, block) == 0 ? 0 : -1;
}

int sh_write(int handle, const uint8_t *data, size_t len) {
    const uint32_t block[3] = {(uint32_t)handle, (uint32_t)(uintptr_t)data, (uint32_t)len};
    return sh_call(SYS_WRITE, block) == 0 ? 0 : -1; /* the result is the count NOT written */
}

int sh_close(int handle) {
    const uint32_t block[1] = {(uint32_t)handle};
    return sh_call(SYS_CLOSE, block) == 0 ? 0 : -1;
}
