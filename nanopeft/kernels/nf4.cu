// NF4 dequantize and quantize on the GPU: the CUDA twin of the torch-ops reference in nanopeft/nf4.py
// (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, §3; the format bit by bit: docs/NF4.md).
//
// nanopeft/nf4_cuda.py compiles this file at first use with NVRTC, which is why it includes no header:
// the few types and the bf16 / fp16 conversions are written out below. The same file also compiles on
// the host under tests/cuda_emulation.h and is checked there bit for bit against the reference, so it
// uses nothing that emulation cannot run: no warp shuffles, and one __syncthreads that every thread of
// a block reaches.
//
// Bit-exactness (docs/NF4.md ("Rounding rules that make it bit-exact")): every product and sum is one
// fp32 operation rounded once (__fmul_rn / __fadd_rn: the compiler may not fuse them into an FMA,
// which rounds once for both and would differ from torch), and the output cast rounds to nearest even,
// as torch's .to(torch.bfloat16 / torch.float16) does.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// 16 bytes moved by one load or store instruction (ld.global.v4.u32 / st.global.v4.u32). A memory-bound
// kernel wants as few, as wide accesses as possible: one 16-byte load brings a thread 32 NF4 codes, one
// 16-byte store writes 8 bf16 values. The pointers must be 16-byte aligned (nf4_cuda.py sees to it).
struct alignas(16) Bytes16 {
    u32 w[4];
};

// ---------------------------------------------------------------------------- float conversions
// fp32 -> bf16 keeps the top 16 bits, rounded to nearest even: add 0x7FFF plus the lowest kept bit,
// then truncate (a carry into the exponent is the correct result). NaN -> 0x7FC0, as in torch.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// fp32 -> fp16, round to nearest even, with fp16's subnormals (|f| < 2^-14) and overflow to inf.
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (u16)(sign | 0x7e00u);        // NaN
    if (a >= 0x47800000u) return (u16)(sign | 0x7c00u);       // |f| >= 2^16: inf
    if (a >= 0x38800000u) {                                   // normal: exponent - 112, top 10 mantissa bits
        u32 h = (a - 0x38000000u) >> 13, rest = a & 0x1fffu;  // rest: the 13 dropped bits
        h += (u32)(rest > 0x1000u) | ((u32)(rest == 0x1000u) & h & 1u);  // 65520 and up round into inf
        return (u16)(sign | h);
    }
    if (a < 0x33000000u) return (u16)sign;                    // |f| < 2^-25: 0
    u32 m = (a & 0x7fffffu) | 0x800000u, s = 126u - (a >> 23);  // f = m · 2^-24 / 2^s, s in [14, 24]
    u32 h = m >> s, rest = m & ((1u << s) - 1u), half = 1u << (s - 1u);
    h += (u32)(rest > half) | ((u32)(rest == half) & h & 1u);   // 1024 (the smallest normal) is exact too
    return (u16)(sign | h);
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float((u32)b << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = (u32)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
    if (e == 31u) return __uint_as_float(sign | 0x7f800000u | (m << 13));       // inf, NaN
    if (e != 0u) return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));  // normal
    float v = __fmul_rn((float)m, 5.9604644775390625e-8f);                      // m · 2^-24, exact
    return __uint_as_float(sign | __float_as_uint(v));
}

// The input and output element types: 0 = fp32, 1 = bf16, 2 = fp16.
template <int T> __device__ __forceinline__ float load1(const void* p, long long i) {
    if (T == 0) return ((const float*)p)[i];
    u16 v = ((const u16*)p)[i];
    return T == 1 ? bf16_to_f32(v) : f16_to_f32(v);
}

template <int T> __device__ __forceinline__ void store1(void* p, long long i, float v) {
    if (T == 0) ((float*)p)[i] = v;
    else ((u16*)p)[i] = T == 1 ? f32_to_bf16(v) : f32_to_f16(v);
}

// 32 consecutive values from p + i (16-byte aligned): 8 loads of 4 fp32, or 4 loads of 8 bf16/fp16.
template <int T> __device__ __forceinline__ void load32(const void* p, long long i, float* v) {
    const Bytes16* src = (const Bytes16*)((const u8*)p + i * (T == 0 ? 4 : 2));
    for (int k = 0; k < (T == 0 ? 8 : 4); ++k) {
        Bytes16 b = src[k];
        for (int j = 0; j < 4; ++j) {
            if (T == 0) {
                v[4 * k + j] = __uint_as_float(b.w[j]);
            } else {  // little endian: the element with the lower index is the low half of the word
                u16 lo = (u16)(b.w[j] & 0xffffu), hi = (u16)(b.w[j] >> 16);
                v[8 * k + 2 * j] = T == 1 ? bf16_to_f32(lo) : f16_to_f32(lo);
                v[8 * k + 2 * j + 1] = T == 1 ? bf16_to_f32(hi) : f16_to_f32(hi);
            }
        }
    }
}

// One 16-byte unit of output at p + i (16-byte aligned): 4 fp32 or 8 bf16/fp16 values.
template <int T> __device__ __forceinline__ void store16(void* p, long long i, const float* v) {
    Bytes16 b;
    for (int j = 0; j < 4; ++j) {
        if (T == 0) {
            b.w[j] = __float_as_uint(v[j]);
        } else {  // little endian: the element with the lower index is the low half of the word
            b.w[j] = T == 1 ? (u32)f32_to_bf16(v[2 * j]) | ((u32)f32_to_bf16(v[2 * j + 1]) << 16)
                            : (u32)f32_to_f16(v[2 * j]) | ((u32)f32_to_f16(v[2 * j + 1]) << 16);
        }
    }
    *(Bytes16*)((u8*)p + i * (T == 0 ? 4 : 2)) = b;
}

// ---------------------------------------------------------------------------- dequantize
// c_b, the absmax of quantization block b. Stored in fp32, or double-quantized (QLoRA §3, docs/NF4.md
// ("Double quantization")): an 8-bit code k_b into the 256-entry dynamic map, scaled by the fp32 absmax
// c2 of its group of `nested_blocksize` (256) blocks, plus the mean subtracted before quantizing:
//     c_b = DYN[k_b] · c2[b / 256] + offset        one rounded product, then one rounded sum
__device__ __forceinline__ float block_absmax(const void* absmax, const float* nested_absmax,
                                              const float* nested_map, const float* offset, long long b,
                                              int nested_blocksize, int double_quant) {
    if (!double_quant) return ((const float*)absmax)[b];
    float c = __fmul_rn(nested_map[((const u8*)absmax)[b]], nested_absmax[b / nested_blocksize]);
    return __fadd_rn(c, offset[0]);
}

// Ŵ_i = NF4[q_i] · c_{i / blocksize}: QLoRA Eq. 6's outer dequantize (the inner one is block_absmax),
// an fp32 product rounded once to T.
// A CUDA block of DQ_THREADS = 256 threads owns DQ_VALUES = 8192 values: 4096 bytes of codes in,
// 16 KiB (bf16/fp16) or 32 KiB (fp32) out. Byte j of the codes holds value 2j in its high nibble and
// 2j + 1 in its low one.
//  1. Thread t copies bytes [16t, 16t + 16) of the block's codes into shared memory with one 16-byte
//     load (a warp reads 512 contiguous bytes per instruction), and thread t < 8192 / blocksize
//     decodes the block's t-th absmax.
//  2. The output goes out in 16-byte units (8 bf16/fp16 or 4 fp32 values); unit u = t + 256·k takes
//     its 4 (or 2) code bytes from shared memory, so consecutive threads write consecutive units and
//     a warp stores 512 contiguous bytes per instruction, every 32-byte sector whole. (Writing the 32
//     values of its own 16-byte load, a thread's stores would sit 64 bytes apart and a warp would touch
//     each sector half at a time.) Writes are 4/5 of the bytes moved, so their pattern sets the speed.
// The last CUDA block may hold the ragged end: it loads and stores that byte by byte, never past the
// arrays. Every thread reaches the __syncthreads: none returns before it.
#define DQ_THREADS 256
#define DQ_VALUES (32 * DQ_THREADS)

template <int T> __device__ __forceinline__ void dequantize(const u8* packed, const void* absmax,
                                                            const float* quant_map, const float* nested_absmax,
                                                            const float* nested_map, const float* offset,
                                                            void* out, int n, int blocksize,
                                                            int nested_blocksize, int double_quant) {
    // the 16 NF4 codes: 16 consecutive words sit in 16 different banks, so the lanes of a warp read
    // any mix of them in one pass (a __constant__ table would serialise different addresses)
    __shared__ float code[16];
    __shared__ Bytes16 codes[DQ_THREADS];       // this block's 4096 bytes of packed codes
    __shared__ float scale[DQ_VALUES / 32];     // its absmaxes c_b (blocksize >= 32: at most 256)
    const unsigned t = threadIdx.x;
    const long long v0 = (long long)blockIdx.x * DQ_VALUES, nbytes = ((long long)n + 1) / 2;
    const long long b0 = v0 / 2 + 16LL * t;     // the 16 code bytes this thread loads
    if (t < 16) code[t] = quant_map[t];
    if (b0 + 16 <= nbytes) {
        codes[t] = *(const Bytes16*)(packed + b0);
    } else {  // at or past the ragged end: the bytes that exist, one at a time
        Bytes16 b = {{0u, 0u, 0u, 0u}};
#pragma unroll
        for (int j = 0; j < 16; ++j)  // (constant indices keep b in registers)
            if (b0 + j < nbytes) b.w[j / 4] |= (u32)packed[b0 + j] << (8 * (j % 4));
        codes[t] = b;
    }
    const long long blk0 = v0 / blocksize, nblocks = ((long long)n + blocksize - 1) / blocksize;
    if (t < (unsigned)(DQ_VALUES / blocksize) && blk0 + t < nblocks)
        scale[t] = block_absmax(absmax, nested_absmax, nested_map, offset, blk0 + t, nested_blocksize, double_quant);
    __syncthreads();

    const u8* bytes = (const u8*)codes;
    const int per = T == 0 ? 4 : 8;  // values per 16-byte unit of output
    for (int k = 0; k < 32 / per; ++k) {
        const int u = (int)t + DQ_THREADS * k, first = per * u;  // unit u: values [first, first + per)
        const long long i = v0 + first;
        if (i >= n) break;
        const float c = scale[first / blocksize];
        float v[8];
#pragma unroll
        for (int j = 0; j < per; j += 2) {
            u32 byte = bytes[(first + j) / 2];
            v[j] = __fmul_rn(code[byte >> 4], c);
            v[j + 1] = __fmul_rn(code[byte & 15u], c);
        }
        if (i + per <= n) {
            store16<T>(out, i, v);
        } else {
#pragma unroll
            for (int j = 0; j < per; ++j)  // constant indices keep v in registers
                if (i + j < n) store1<T>(out, i + j, v[j]);
        }
    }
}

#define NF4_DEQUANTIZE(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const u8* packed, const void* absmax, const float* quant_map,         \
                                    const float* nested_absmax, const float* nested_map,                 \
                                    const float* offset, void* out, int n, int blocksize,                \
                                    int nested_blocksize, int double_quant) {                            \
        dequantize<T>(packed, absmax, quant_map, nested_absmax, nested_map, offset, out, n, blocksize,  \
                      nested_blocksize, double_quant);                                                   \
    }
NF4_DEQUANTIZE(nf4_dequantize_f32, 0)
NF4_DEQUANTIZE(nf4_dequantize_bf16, 1)
NF4_DEQUANTIZE(nf4_dequantize_f16, 2)

// ---------------------------------------------------------------------------- quantize
// q = #{k : mid[k] < v}, the 15 decision thresholds (midpoints of adjacent codes): a value exactly on
// a threshold takes the lower code, as bitsandbytes does. Thresholds live in registers (fully unrolled).
__device__ __forceinline__ u32 nf4_code(float v, const float* mid) {
    u32 q = 0;
#pragma unroll
    for (int k = 0; k < 15; ++k) q += (u32)(v > mid[k]);
    return q;
}

// Thread b owns quantization block b: values [b·bs, b·bs + bs). Pass 1 finds c_b = max|x| (QLoRA Eq. 1)
// by comparing the magnitudes' bit patterns as integers, which orders finite floats like their values
// and makes a NaN win (so a NaN shows as a NaN absmax; nf4_cuda.py raises on it). Pass 2 re-reads the
// block (now in L1/L2) and writes bs/2 packed bytes in 16-byte stores. Like bitsandbytes' CPU kernel,
// a whole block scales by the fp32 reciprocal of c_b and the ragged last block divides by c_b, which is
// clamped to 1e-38 there and stored clamped. Double quantization of c is left to torch (nf4.py).
template <int T> __device__ __forceinline__ void quantize(const void* x, const float* mid_table, u8* packed,
                                                          float* absmax, int n, int blocksize) {
    long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x, i0 = b * blocksize;
    if (i0 >= n) return;
    float mid[15];
#pragma unroll
    for (int k = 0; k < 15; ++k) mid[k] = mid_table[k];
    const float tiny = 1e-38f;
    if (i0 + blocksize <= n) {
        u32 m = 0;
        float v[32];
        for (long long i = i0; i < i0 + blocksize; i += 32) {
            load32<T>(x, i, v);
            for (int j = 0; j < 32; ++j) {
                u32 a = __float_as_uint(v[j]) & 0x7fffffffu;
                m = a > m ? a : m;
            }
        }
        float c = __uint_as_float(m);
        absmax[b] = c;
        float r = __frcp_rn(c > tiny ? c : tiny);  // an all-zero block: r = 1e38, every value -> code 7
        for (long long i = i0; i < i0 + blocksize; i += 32) {
            load32<T>(x, i, v);
            Bytes16 out;
            for (int j = 0; j < 16; ++j) {
                u32 byte = nf4_code(__fmul_rn(v[2 * j], r), mid) << 4 | nf4_code(__fmul_rn(v[2 * j + 1], r), mid);
                if (j % 4 == 0) out.w[j / 4] = 0;
                out.w[j / 4] |= byte << (8 * (j % 4));
            }
            *(Bytes16*)(packed + i / 2) = out;
        }
    } else {
        u32 m = 0;
        for (long long i = i0; i < n; ++i) {
            u32 a = __float_as_uint(load1<T>(x, i)) & 0x7fffffffu;
            m = a > m ? a : m;
        }
        float c = __uint_as_float(m > __float_as_uint(tiny) ? m : __float_as_uint(tiny));
        absmax[b] = c;
        for (long long i = i0; i < n; i += 2) {  // an odd n pads the last low nibble with code 7 (= 0.0)
            u32 hi = nf4_code(__fdiv_rn(load1<T>(x, i), c), mid);
            u32 lo = i + 1 < n ? nf4_code(__fdiv_rn(load1<T>(x, i + 1), c), mid) : 7u;
            packed[i / 2] = (u8)(hi << 4 | lo);
        }
    }
}

#define NF4_QUANTIZE(NAME, T)                                                                            \
    extern "C" __global__ void NAME(const void* x, const float* mid, u8* packed, float* absmax, int n,  \
                                    int blocksize) {                                                     \
        quantize<T>(x, mid, packed, absmax, n, blocksize);                                               \
    }
NF4_QUANTIZE(nf4_quantize_f32, 0)
NF4_QUANTIZE(nf4_quantize_bf16, 1)
NF4_QUANTIZE(nf4_quantize_f16, 2)
