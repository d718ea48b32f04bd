/* The clock of one core as it runs: a chain of dependent register adds (x += x) retires one add
 * per cycle, so adds / seconds is cycles per second, turbo included, which /proc/cpuinfo does not
 * give in a VM. (Adds of a constant would not do: newer cores fold them at rename, 3 per cycle.) */
#include <stdio.h>
#include <time.h>

int main(void) {
    const long rounds = 1L << 27;  /* 16 adds each */
    for (int run = 0; run < 5; run++) {  /* one line each: Hz */
        long x = 0;
        struct timespec start, end;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (long i = 0; i < rounds; i++) {
            __asm__ volatile(
                "add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\t"
                "add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\t"
                "add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\t"
                "add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0" : "+r"(x));
        }
        clock_gettime(CLOCK_MONOTONIC, &end);
        double seconds = (end.tv_sec - start.tv_sec) + 1e-9 * (end.tv_nsec - start.tv_nsec);
        printf("%.0f\n", 16.0 * rounds / seconds);
    }
    return 0;
}
