"""PixelCNN (mnist preset) train-step time: plain process, glibc thresholds fixed, forkserver child."""
import json, sys, time, multiprocessing as mp
import torch

def steps(tag, fix=False):
    torch.set_num_threads(2)
    if fix:
        from trilemma.run.execution import fix_allocator
        fix_allocator()
    from trilemma.contract.registry import build_model
    from trilemma.contract.update import plain_update
    mc = json.load(open('/work/main/results/mnist/pixelcnn-mnist-s0/config.json'))['model_config']
    torch.manual_seed(0)
    m = build_model('pixelcnn', (1, 28, 28), None, mc)
    up = plain_update(m)
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    for _ in range(3):
        m.train_step(x, up)
    t = []
    for _ in range(15):
        t0 = time.perf_counter(); m.train_step(x, up); t.append(time.perf_counter() - t0)
    t.sort()
    print(f"{tag}: median {t[len(t)//2]*1000:.0f} ms/step, min {t[0]*1000:.0f}", flush=True)

if __name__ == "__main__":
    which = sys.argv[1]
    if which == "plain":
        steps("plain process")
    elif which == "fixed":
        steps("plain process, glibc thresholds fixed", True)
    elif which == "forkserver":
        ctx = mp.get_context("forkserver"); ctx.set_forkserver_preload(["trilemma.run.worker"])
        p = ctx.Process(target=steps, args=("forkserver child, fixed", True)); p.start(); p.join()
    elif which == "forkserver_plain":
        ctx = mp.get_context("forkserver"); ctx.set_forkserver_preload(["trilemma.run.worker"])
        p = ctx.Process(target=steps, args=("forkserver child, not fixed", False)); p.start(); p.join()
