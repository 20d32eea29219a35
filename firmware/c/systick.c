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
#define SYSTICK_RELOAD 0x00FFFFFFu /* the 24-bit maximum: fewest interrupts */

static volatile uint32_t wraps;

void SysTick_Handler(void) { wraps++; }

void systick_start(uint32_t clock_source) {
    SYST_CSR = 0u;
    wraps = 0u;
    SYST_RVR = SYSTICK_RELOAD;
    SYST_CVR = 0u; /* any write clears the counter; it reloads on the next tick */
    SYST_CSR = SYST_CSR_ENABLE | SYST_CSR_TICKINT | (clock_source << SYST_CSR_CLKSOURCE_SHIFT);
}

uint64_t systick_ticks(void) {
    uint32_t primask, high, value;
    __asm__ volatile("mrs %0, primask\n\tcpsid i" : "=r"(primask)::"memory");
    high = wraps;
    value = SYST_CVR;
    /* Wrapped while interrupts were masked: the wrap is not counted yet; read the value after it. */
    if (SCB_ICSR & ICSR_PENDSTSET) {
        high++;
        value = SYST_CVR;
    }
    __asm__ volatile("msr primask, %0" ::"r"(primask) : "memory");
    return (uint64_t)high * (SYSTICK_RELOAD + 1u) + (SYSTICK_RELOAD - value);
}
