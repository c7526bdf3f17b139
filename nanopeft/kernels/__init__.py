"""NF4 on a GPU: nf4.cu compiled at run time by NVRTC and called as torch ops (nf4_cuda.py), the fast
path of nanopeft/nf4.py (bit-identical, tested)."""
