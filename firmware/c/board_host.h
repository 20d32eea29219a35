/*
 * Host-only set-up of the fake board (board_host.c), called before board_init(): the UART on
 * stdin/stdout (the default) or on in-memory queues a test feeds and drains, and the flash
 * region in RAM, optionally backed by a file as the QEMU runner's flash.img.
 */
#ifndef BOARD_HOST_H
#define BOARD_HOST_H

#include <stddef.h>
#include <stdint.h>

#define BOARD_HOST_FLASH_SIZE 0x00100000u /* as mps2-an386's region: same slot layout */
#define BOARD_HOST_QUEUE_BYTES 65536u

/* UART on two in-memory queues instead of stdin/stdout. */
void board_host_use_loopback(void);
/* Queue bytes for board_uart_getc. Returns 0, or -1 when they do not fit. */
int board_host_feed(const uint8_t *data, size_t len);
/* Move up to cap bytes that board_uart_write wrote into out; returns how many. */
size_t board_host_take(uint8_t *out, size_t cap);
/* Back the flash region by a file: its bytes are read now (a missing file is created, a short
 * one reads as zeros beyond its end) and every write goes through. Returns 0 or -1. */
int board_host_set_flash_file(const char *path);

#endif /* BOARD_HOST_H */
