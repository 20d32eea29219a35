/*
 * The ARMv6-M/ARMv7-M SysTick as a 64-bit tick counter: it counts down from 2^24 - 1 and the
 * interrupt counts the wraps. Under QEMU -icount shift=0 the board's clocks advance 1 ns per
 * guest instruction, so ticks x ns per tick is an instruction count (board_instructions()).
 */
#ifndef SYSTICK_H
#define SYSTICK_H

#include <stdint.h>

/* SYST_CSR.CLKSOURCE: 1 the processor clock, 0 the board's external reference clock. */
#define SYSTICK_CLOCK_CPU 1u
#define SYSTICK_CLOCK_REFERENCE 0u

void systick_start(uint32_t clock_source);
/* Ticks since systick_start. */
uint64_t systick_ticks(void);

#endif /* SYSTICK_H */
