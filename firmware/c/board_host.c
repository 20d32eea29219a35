/*
 * board.h on the host: the fake the device application's host tests run against.
 *
 * UART: stdin/stdout (non-blocking reads through poll), or in-memory queues (board_host.h).
 * Instructions: there is no instruction counter on the host, so board_instructions() is the
 * monotonic clock in ns (the QEMU boards' 1 instruction per ns convention, with 1 "instruction"
 * per tick): good for ordering and budgets in tests, not a measurement. Flash: a 1 MiB array,
 * zero at start as mps2-an386's unloaded code memory, optionally mirrored to a file.
 * Console and exit: stderr (stdout may carry the UART) and exit().
 */
#define _POSIX_C_SOURCE 200809L

#include "board_host.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "board.h"

typedef struct {
    uint8_t bytes[BOARD_HOST_QUEUE_BYTES];
    size_t head; /* next byte to read */
    size_t count;
} queue_t;

static int loopback;
static queue_t to_device;   /* board_host_feed -> board_uart_getc */
static queue_t from_device; /* board_uart_write -> board_host_take */
static uint8_t flash[BOARD_HOST_FLASH_SIZE];
static FILE *flash_file;
static uint64_t boot_ns;

static uint64_t monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

static int queue_put(queue_t *q, const uint8_t *data, size_t len) {
    size_t i;
    if (len > BOARD_HOST_QUEUE_BYTES - q->count) return -1;
    for (i = 0; i < len; i++) q->bytes[(q->head + q->count + i) % BOARD_HOST_QUEUE_BYTES] = data[i];
    q->count += len;
    return 0;
}

static size_t queue_get(queue_t *q, uint8_t *out, size_t cap) {
    size_t n = q->count < cap ? q->count : cap, i;
    for (i = 0; i < n; i++) out[i] = q->bytes[(q->head + i) % BOARD_HOST_QUEUE_BYTES];
    q->head = (q->head + n) % BOARD_HOST_QUEUE_BYTES;
    q->count -= n;
    return n;
}

void board_host_use_loopback(void) { loopback = 1; }

int board_host_feed(const uint8_t *data, size_t len) { return queue_put(&to_device, data, len); }

size_t board_host_take(uint8_t *out, size_t cap) { return queue_get(&from_device, out, cap); }

int board_host_set_flash_file(const char *path) {
    FILE *file = fopen(path, "r+b");
    if (file == NULL) file = fopen(path, "w+b");
    if (file == NULL) return -1;
    memset(flash, 0, sizeof flash);
    (void)fread(flash, 1, sizeof flash, file); /* a short file: zeros beyond its end */
    if (ferror(file)) {
        fclose(file);
        return -1;
    }
    if (flash_file != NULL) fclose(flash_file);
    flash_file = file;
    return 0;
}

void board_init(void) { boot_ns = monotonic_ns(); }

const char *board_name(void) { return "host"; }

int board_uart_getc(void) {
    struct pollfd in = {STDIN_FILENO, POLLIN, 0};
    uint8_t byte;
    if (loopback) return queue_get(&to_device, &byte, 1u) == 1u ? byte : -1;
    if (poll(&in, 1, 0) != 1 || read(STDIN_FILENO, &byte, 1u) != 1) return -1;
    return byte;
}

void board_uart_write(const uint8_t *data, size_t len) {
    if (loopback) {
        if (queue_put(&from_device, data, len) != 0) board_puts("board_host: UART loopback queue full, bytes dropped\n");
        return;
    }
    while (len > 0u) {
        ssize_t written = write(STDOUT_FILENO, data, len);
        if (written <= 0) return; /* the host closed the UART */
        data += written;
        len -= (size_t)written;
    }
}

uint64_t board_instructions(void) { return monotonic_ns() - boot_ns; }

uint32_t board_instructions_per_tick(void) { return 1u; }

uint32_t board_millis(void) { return (uint32_t)(board_instructions() / 1000000u); }

const uint8_t *board_flash_base(void) { return flash; }

uint32_t board_flash_size(void) { return BOARD_HOST_FLASH_SIZE; }

int board_flash_write(uint32_t offset, const uint8_t *data, size_t len) {
    if (data == NULL || offset > BOARD_HOST_FLASH_SIZE || len > BOARD_HOST_FLASH_SIZE - offset) return -1;
    memcpy(flash + offset, data, len);
    if (flash_file == NULL) return 0;
    if (fseek(flash_file, (long)offset, SEEK_SET) != 0 || fwrite(data, 1, len, flash_file) != len ||
        fflush(flash_file) != 0) {
        return -1;
    }
    return 0;
}

void board_puts(const char *text) { fputs(text, stderr); }

void board_exit(int code) {
    if (flash_file != NULL) fclose(flash_file);
    exit(code);
}
