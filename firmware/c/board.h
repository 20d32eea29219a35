/*
 * The narrow hardware interface of the firmware images: one implementation per board
 * (board_mps2.c: QEMU mps2-an386, Cortex-M4F; board_microbit.c: QEMU microbit, Cortex-M0) and
 * board_host.c, the fake for host tests. Everything else in the firmware is board-independent.
 */
#ifndef BOARD_H
#define BOARD_H

#include <stddef.h>
#include <stdint.h>

void board_init(void);
const char *board_name(void);  /* "mps2-an386", "microbit", "host" */

/* UART0: non-blocking read (-1 when no byte is waiting), blocking write. */
int board_uart_getc(void);
void board_uart_write(const uint8_t *data, size_t len);

/* Instructions executed since boot (QEMU -icount shift=0: SysTick ticks x ns per tick). */
uint64_t board_instructions(void);
/* Instructions per SysTick tick: the resolution of board_instructions(). */
uint32_t board_instructions_per_tick(void);
/* Milliseconds of the virtual clock since boot. */
uint32_t board_millis(void);

/* The persistent "flash" region (provisioning block, slot table, model slots). Reads are
 * memory-mapped; writes go to memory and, where the board has one, to its backing file
 * (semihosting), so they survive a restart. Returns 0, or -1 when out of range or not persisted. */
const uint8_t *board_flash_base(void);
uint32_t board_flash_size(void);
int board_flash_write(uint32_t offset, const uint8_t *data, size_t len);

/* Semihosting console and exit (test and measurement images). */
void board_puts(const char *text);
void board_exit(int code);

#endif /* BOARD_H */
