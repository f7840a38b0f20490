// Checks kernels/topk.cu on the CPU (tools/topk_emu/run.sh): the kernel's own code, compiled as C++ over the
// emulated built-ins of emu.cuh, against the definition: every gallery row scored with fmaf in column order
// (as the kernel does, so scores are bit-equal), keyed as src/cuda/topk.rs keys them, sorted, cut at K.
// Covers G < K, single rows, exclusions (including a user with one admissible row), widths below, at and
// past the 64-column slab, grid-valued embeddings with exact ties, duplicate rows and NaNs, K up to 256, and
// galleries split into parts merged by topk_merge. `test quick` runs two cases.
#include <cstdio>
#include <cstdlib>
#include "common.cuh"
#include "topk_emu.cu"

typedef unsigned long long u64;
// Mirrors src/cuda/topk.rs: rank_key, plan.
static u64 host_key(float s, unsigned row) {
    unsigned hi;
    if (std::isnan(s)) hi = 0; else { unsigned b = s == 0.0f ? 0u : __float_as_uint(s); hi = (b & 0x80000000u) ? ~b : (b | 0x80000000u); }
    return ((u64)hi << 32) | (u64)(0xffffffffu - row);
}

struct Case { int n, m, d, k, splits; bool excl; bool grid; };

static int run_case(const Case& c, std::mt19937& rng) {
    int n = c.n, m = c.m, d = c.d, k = c.k;
    std::uniform_real_distribution<float> uni(-1, 1);
    std::uniform_int_distribution<int> gi(-4, 4);
    std::vector<float> users(n * d), gallery((size_t)m * d);
    for (auto& v : users) v = c.grid ? gi(rng) / 8.0f : uni(rng);
    for (auto& v : gallery) v = c.grid ? gi(rng) / 8.0f : uni(rng);
    if (c.grid && m > 3) {  // duplicates and NaNs
        for (int t = 0; t < m / 10; ++t) { int a = rng() % m, b = rng() % m; std::copy(&gallery[(size_t)a*d], &gallery[(size_t)a*d] + d, &gallery[(size_t)b*d]); }
        for (int t = 0; t < 2; ++t) gallery[(size_t)(rng() % m) * d + rng() % d] = NAN;
    }
    std::vector<std::vector<int>> ex(n);
    std::vector<int> offsets(n + 1, 0), rows;
    if (c.excl) {
        for (int u = 0; u < n; ++u) {
            int cnt = rng() % 40;
            if (u == 1) cnt = m;  // exclude (nearly) everything
            for (int t = 0; t < cnt; ++t) ex[u].push_back(u == 1 ? t : (int)(rng() % m));
            std::sort(ex[u].begin(), ex[u].end()); ex[u].erase(std::unique(ex[u].begin(), ex[u].end()), ex[u].end());
            if (u == 1 && m > 3) ex[u].erase(ex[u].begin() + 1);  // keep row 1 only... leave row 1 admissible
        }
        for (int u = 0; u < n; ++u) { offsets[u + 1] = offsets[u] + ex[u].size(); rows.insert(rows.end(), ex[u].begin(), ex[u].end()); }
    }
    int splits = c.splits;
    int span = ((m + splits - 1) / splits + 63) / 64 * 64; if (span < 64) span = 64;
    splits = std::max(1, (m + span - 1) / span);
    std::vector<u64> out((size_t)n * k, ~0ull), parts((size_t)splits * n * k, ~0ull);
    u64* lists = splits > 1 ? parts.data() : out.data();
    const int* eo = c.excl ? offsets.data() : nullptr;
    const int* er = c.excl ? (rows.empty() ? offsets.data() : rows.data()) : nullptr;
    emu::launch({(unsigned)((n + 127) / 128), (unsigned)splits, 0}, 256, TOPK_SHARED_BYTES,
                [&] { topk_select(lists, users.data(), gallery.data(), eo, er, n, m, d, k, span); });
    if (splits > 1)
        emu::launch({(unsigned)((n + 7) / 8), 1, 0}, 256, 0, [&] { topk_merge(out.data(), parts.data(), n, k, splits); });
    int bad = 0;
    for (int u = 0; u < n; ++u) {
        std::vector<u64> keys;
        for (int r = 0; r < m; ++r) {
            if (std::binary_search(ex[u].begin(), ex[u].end(), r)) continue;
            float acc = 0.0f;
            for (int q = 0; q < d; ++q) acc = fmaf(users[u * d + q], gallery[(size_t)r * d + q], acc);
            keys.push_back(host_key(acc, r));
        }
        std::sort(keys.begin(), keys.end(), std::greater<u64>());
        keys.resize(k, 0ull);
        for (int i = 0; i < k; ++i)
            if (keys[i] != out[(size_t)u * k + i]) {
                if (bad < 5) fprintf(stderr, "  user %d pos %d: got %016llx want %016llx\n", u, i, out[(size_t)u*k+i], keys[i]);
                bad++;
                break;
            }
    }
    printf("n %d m %d d %d k %d splits %d excl %d grid %d: %s\n", n, m, d, k, splits, c.excl, c.grid, bad ? "FAIL" : "ok");
    return bad;
}

int main_all() {
    std::mt19937 rng(7);
    Case cases[] = {
        {3, 5, 64, 10, 1, false, false}, {3, 5, 64, 10, 1, true, false}, {1, 1, 64, 1, 1, false, false},
        {20, 300, 64, 1, 1, true, false}, {129, 700, 64, 40, 1, true, false}, {40, 1000, 16, 20, 1, true, true},
        {30, 900, 96, 33, 1, true, false}, {30, 900, 132, 64, 1, false, true}, {50, 3000, 8, 100, 3, true, true},
        {10, 2000, 64, 256, 4, true, false}, {10, 2000, 64, 256, 1, false, true}, {5, 40, 64, 60, 1, true, true},
        {17, 2500, 32, 97, 5, true, false},
    };
    int fails = 0;
    for (auto& c : cases) fails += run_case(c, rng) != 0;
    printf("%d failing cases\n", fails);
    return fails != 0;
}
int main(int argc, char** argv) {
    if (argc < 2) return main_all();
    std::mt19937 rng(9);
    Case c1 = {129, 700, 64, 40, 1, true, false}, c2 = {10, 2000, 64, 100, 3, true, true};
    return (run_case(c1, rng) != 0) + (run_case(c2, rng) != 0);
}
