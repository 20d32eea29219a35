/* SysTick as a 64-bit tick counter; see systick.h. */
#include "systick.h"

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define SCB_ICSR (*(volatile uint32_t *)0xE000ED04u)
#define SYST_CSR_ENABLE 1u
#define SYST_CSR_TICKINT 2u
#define SYST_CSR_CLKSOURCE_SHIFT 2u
#define ICSR_PENDSTSET (1u << 26)
#define ICSR_PENDSTCLR (1u << 25)
#define SYSTICK_RELOAD 0x00FFFFFFu /* the 24-bit maximum: fewest interrupts */

static volatile uint32_t wraps;

void SysTick_Handler(void) { wraps++; }

void systick_start(uint32_t clock_source) {
    SYST_CSR = 0u;
    SYST_RVR = SYSTICK_RELOAD;
    SYST_CVR = 0u; /* any write clears the counter; it loads the reload value on the next tick */
    SYST_CSR = SYST_CSR_ENABLE | SYST_CSR_TICKINT | (clock_source << SYST_CSR_CLKSOURCE_SHIFT);
    /* Until that first tick the counter reads 0, which systick_ticks would take for a full period:
     * start counting once it has loaded, with no wrap counted or pending. */
    while (SYST_CVR == 0u) {
    }
    SCB_ICSR = ICSR_PENDSTCLR;
    wraps = 0u;
}

/*
 * The counter loads the reload value R and counts down; the tick that takes it from 1 to 0 pends
 * the interrupt (wraps++), and the next tick reloads it. So t ticks after the first load, with
 * P = R + 1: t = wraps P + R - value while value > 0, and t = wraps P - 1 while it reads 0 (wraps
 * already counts the period that is ending).
 */
uint64_t systick_ticks(void) {
    uint32_t primask, high, value;
    __asm__ volatile("mrs %0, primask\n\tcpsid i" : "=r"(primask)::"memory");
    high = wraps;
    value = SYST_CVR;
    /* Reached 0 while interrupts were masked: that wrap is not counted yet; read the value after it. */
    if (SCB_ICSR & ICSR_PENDSTSET) {
        high++;
        value = SYST_CVR;
    }
    __asm__ volatile("msr primask, %0" ::"r"(primask) : "memory");
    if (value == 0u) return (uint64_t)high * (SYSTICK_RELOAD + 1u) - 1u;
    return (uint64_t)high * (SYSTICK_RELOAD + 1u) + (SYSTICK_RELOAD - value);
}
