/* The fp32 FMA throughput the cores reach, measured: each of N threads runs 12 independent chains
 * of vector FMAs (enough to hide the FMA latency on both FMA units), so FLOP / second is the peak
 * at the clock the cores keep under vector load, which the scalar clock of clock.c overstates on
 * CPUs that lower it for AVX-512. Compiled here with -march=native. Usage: fma THREADS; prints one
 * line per run: FLOP/s of all threads together. */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define SUM _mm512_reduce_add_ps
#elif defined(__FMA__)
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
static float SUM(__m256 v) { float out[8]; _mm256_storeu_ps(out, v); float s = 0; for (int i = 0; i < 8; i++) s += out[i]; return s; }
#else
#error "needs FMA (AVX2) or AVX-512"
#endif

#define CHAINS 12  /* EACH below names them */
static const long ROUNDS = 1L << 25;
static pthread_barrier_t start;
static volatile float sink;

/* twelve accumulators by name, so that the compiler keeps each in a register */
#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DECLARE(c) vec acc##c = SET1((float)c);
#define STEP(c) acc##c = FMA(acc##c, a, b);
#define ADD(c) s += SUM(acc##c);

static void *work(void *unused) {
    (void)unused;
    const vec a = SET1(0.999999f), b = SET1(1e-7f);
    EACH(DECLARE)
    pthread_barrier_wait(&start);
    for (long i = 0; i < ROUNDS; i++) {
        EACH(STEP)
    }
    float s = 0;
    EACH(ADD)
    sink = s;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1) return 2;
    pthread_t ids[threads];
    printf("%d\n", LANES * 32);  /* first line: the vector width in bits */
    for (int run = 0; run < 5; run++) {
        pthread_barrier_init(&start, NULL, threads + 1);
        for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, work, NULL);
        struct timespec t0, t1;
        pthread_barrier_wait(&start);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        pthread_barrier_destroy(&start);
        double seconds = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
        printf("%.0f\n", 2.0 * LANES * CHAINS * (double)ROUNDS * threads / seconds);
    }
    return 0;
}
