"""gblr training step (fwd+bwd, bf16 autocast, 128×197 tokens) eager and under torch.compile, against
nn.Linear eager and compiled, same process, CUDA events (median of 20 after 5 warm-up calls).

    python scripts/bench_gblr_compile.py
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from structlab.layers import make_layer  # noqa: E402

torch.manual_seed(0)


def bench(fn, iters=20):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


for n_in, n_out in [(768, 3072), (3072, 768), (768, 768)]:
    x = torch.randn(25216, n_in, device="cuda", requires_grad=True)
    g = torch.randn(25216, n_out, device="cuda")
    res = {}
    for name, mk in [
        ("dense", lambda: torch.nn.Linear(n_in, n_out)),
        ("gblr1.0", lambda: make_layer("gblr", n_in, n_out, budget=1.0)),
        ("gblr0.25", lambda: make_layer("gblr", n_in, n_out, budget=0.25)),
    ]:
        for comp in (False, True):
            layer = mk().cuda()
            f = torch.compile(layer) if comp else layer

            def step():
                x.grad = None
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = f(x)
                y.backward(g)

            try:
                res[(name, comp)] = bench(step)
            except Exception as err:
                res[(name, comp)] = float("nan")
                print(name, comp, "failed:", type(err).__name__, str(err)[:300])
    d0, d1 = res[("dense", False)], res[("dense", True)]
    for (name, comp), t in res.items():
        print(
            f"{n_in}->{n_out} {name:9s} compile={comp!s:5s} {t:.3f} ms  vs dense eager {t / d0:.2f}x  vs dense compiled {t / d1:.2f}x"
        )
