
#ifdef SPECTRALMC_HOST
#include <math.h>
#define DEVICE static inline
#define KERNEL(name) extern "C" void name##_host
#define FOR_EACH_THREAD(total) for (long long tid = 0; tid < (total); ++tid)
static inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
static inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }
#else
#define DEVICE __device__ __forceinline__
#define KERNEL(name) extern "C" __global__ void name
#define FOR_EACH_THREAD(total) \
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x; \
    if (tid < (total))
#endif

#ifndef REAL
#define REAL float
#endif
#define MAX_STEPS 64

DEVICE float ex(float x) { return expf(x); }
DEVICE double ex(double x) { return exp(x); }
DEVICE float lg(float x) { return logf(x); }
DEVICE double lg(double x) { return log(x); }
DEVICE float sq(float x) { return sqrtf(x); }
DEVICE double sq(double x) { return sqrt(x); }
DEVICE float ndtr(float x) { return normcdff(x); }
DEVICE double ndtr(double x) { return normcdf(x); }
DEVICE REAL mx(REAL a, REAL b) { return a > b ? a : b; }
DEVICE REAL mn(REAL a, REAL b) { return a < b ? a : b; }

/* Brownian bridge: normals in bridge order -> increments in time order (bridge.py). */
DEVICE void bridge(const REAL* zp, int n, const int* plan_idx, const REAL* plan_w, REAL* w, REAL* out) {
    w[0] = (REAL)0;
    for (int k = 0; k < n; ++k) {
        int pt = plan_idx[3 * k], lo = plan_idx[3 * k + 1], hi = plan_idx[3 * k + 2];
        REAL zk = zp[k];
        if (hi < 0) w[pt] = plan_w[3 * k + 2] * zk;
        else w[pt] = plan_w[3 * k] * w[lo] + plan_w[3 * k + 1] * w[hi] + plan_w[3 * k + 2] * zk;
    }
    for (int i = 0; i < n; ++i) out[i] = w[i + 1] - w[i];
}

/* Heston QE-M (heston.py): params (B, 6) = v0, kappa, theta, xi, rho, T; z[b*sb + p*sn + k],
   k < steps the variance normals, k >= steps the price normals; x (B, N). */
KERNEL(heston_qe)(const REAL* __restrict__ z, int sb, int sn,
                  const REAL* __restrict__ params, const int* __restrict__ plan_idx,
                  const REAL* __restrict__ plan_w, int B, int N, int steps, int use_bridge,
                  REAL* __restrict__ x_out) {
    FOR_EACH_THREAD((long long)B * N) {
        int b = (int)(tid / N);
        long long p = tid % N;
        const REAL* zp = z + (long long)b * sb + p * sn;
        const REAL* th = params + 6 * b;
        REAL v0 = th[0], kappa = th[1], mean_v = th[2], xi = th[3], rho = th[4];
        REAL dt = th[5] / (REAL)steps;
        REAL work[MAX_STEPS + 1], zv[MAX_STEPS], zx[MAX_STEPS];
        if (use_bridge) {
            bridge(zp, steps, plan_idx, plan_w, work, zv);
            bridge(zp + steps, steps, plan_idx, plan_w, work, zx);
        } else {
            for (int i = 0; i < steps; ++i) { zv[i] = zp[i]; zx[i] = zp[steps + i]; }
        }
        REAL ekt = ex(-kappa * dt);
        REAL c1 = xi * xi * ekt * ((REAL)1 - ekt) / kappa;
        REAL c2 = mean_v * xi * xi * ((REAL)1 - ekt) * ((REAL)1 - ekt) / ((REAL)2 * kappa);
        REAL half = (REAL)0.5 * dt * (kappa * rho / xi - (REAL)0.5);
        REAL k1 = half - rho / xi, k2 = half + rho / xi;
        REAL k3 = (REAL)0.5 * dt * ((REAL)1 - rho * rho);
        REAL k0 = -rho * kappa * mean_v * dt / xi;
        REAL big_a = k2 + (REAL)0.5 * k3;
        REAL v = v0, x = (REAL)0;
        for (int i = 0; i < steps; ++i) {
            REAL m = mean_v + (v - mean_v) * ekt;
            REAL s2 = c1 * v + c2;
            REAL psi = s2 / (m * m);
            REAL zi = zv[i];
            REAL v_next, log_m;
            bool ok;
            if (psi <= (REAL)1.5) {
                REAL inv = (REAL)2 / mx(psi, (REAL)1e-12);
                REAL b2 = mx(inv - (REAL)1 + sq(inv) * sq(mx(inv - (REAL)1, (REAL)0)), (REAL)0);
                REAL a = m / ((REAL)1 + b2);
                REAL r = sq(b2) + zi;
                v_next = a * r * r;
                REAL den = mx((REAL)1 - (REAL)2 * big_a * a, (REAL)1e-12);
                log_m = lg(ex(big_a * b2 * a / den) / sq(den));
                ok = big_a * a < (REAL)0.5;
            } else {
                REAL pp = mn(mx((psi - (REAL)1) / (psi + (REAL)1), (REAL)0), (REAL)1);
                REAL beta = ((REAL)1 - pp) / m;
                REAL u = ndtr(zi);
                REAL tail = ndtr(-zi);
                v_next = u <= pp ? (REAL)0 : lg(((REAL)1 - pp) / tail) / beta;
                log_m = lg(pp + beta * ((REAL)1 - pp) / mx(beta - big_a, (REAL)1e-12));
                ok = big_a < beta;
            }
            REAL k0s = ok ? -log_m - (k1 + (REAL)0.5 * k3) * v : k0;
            REAL var = mx(k3 * (v + v_next), (REAL)0);
            x = x + k0s + k1 * v + k2 * v_next + sq(var) * zx[i];
            v = v_next;
        }
        x_out[tid] = x;
    }
}

/* Arithmetic average of GBM over n fixings (asian.py): params (B, 4) = vol, T, n, s_geo;
   weights (B, M) the normalised forward weights (0 past n); z[b*sb + p*sn + i].
   x = log sum_i w_i exp(l_i), l_i = -vol^2 t_i / 2 + vol W(t_i), by a running
   log-sum-exp; xc = -s_geo^2 / 2 + vol (1/n) sum_i W(t_i) (the control variate). */
KERNEL(asian_average)(const REAL* __restrict__ z, int sb, int sn,
                      const REAL* __restrict__ params, const REAL* __restrict__ weights, int M,
                      int B, int N, REAL* __restrict__ x_out, REAL* __restrict__ xc_out,
                      int companion) {
    FOR_EACH_THREAD((long long)B * N) {
        int b = (int)(tid / N);
        long long p = tid % N;
        const REAL* zp = z + (long long)b * sb + p * sn;
        const REAL* th = params + 4 * b;
        const REAL* wb = weights + (long long)M * b;
        REAL vol = th[0], expiry = th[1], s_geo = th[3];
        int n = (int)th[2];
        REAL dt = expiry / (REAL)n, sdt = sq(dt);
        REAL w = (REAL)0, top = (REAL)0, acc = (REAL)0, wsum = (REAL)0;
        for (int i = 0; i < n; ++i) {
            w += zp[i] * sdt;
            REAL t = (REAL)(i + 1) * expiry / (REAL)n;
            REAL l = (REAL)-0.5 * vol * vol * t + vol * w;
            if (i == 0) { top = l; acc = wb[0]; }
            else if (l > top) { acc = acc * ex(top - l) + wb[i]; top = l; }
            else acc += wb[i] * ex(l - top);
            wsum += w;
        }
        x_out[tid] = top + lg(acc);
        if (companion) xc_out[tid] = (REAL)-0.5 * s_geo * s_geo + vol * wsum / (REAL)n;
    }
}
