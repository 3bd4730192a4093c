#!/bin/bash
# A/B: the same short VAE and DCGAN runs in a fresh worker and in the suite's process, interleaved;
# then each beside two CPU hogs. Results under /tmp/ab/r/<label>.
cd /work/main
export TRILEMMA_DATA=/work/shared/datasets TRILEMMA_FID_WEIGHTS=/work/shared/weights/inception-v3-compat-pool3.pth
T=.venv/bin/trilemma
OV="train.max_flops=null train.max_images=20000 train.eval_points=0 eval.fid_samples=200 eval.fid_ref_images=2000 eval.curve_fid_samples=0 eval.nll=false eval.scaling=false eval.coverage=false"
run() { label=$1; shift; rm -rf /tmp/ab/r/$label; $T run suites/mnist.yaml --models vae,dcgan --results /tmp/ab/r/$label $OV "$@" > /tmp/ab/$label.log 2>&1; echo "$label rc=$?"; }
for rep in 1 2; do
  run worker$rep
  run inproc$rep --in-process
done
python3 -c "
import subprocess,sys,time
hogs=[subprocess.Popen([sys.executable,'-c','while True: pass']) for _ in range(2)]
time.sleep(1)
r=subprocess.run(['bash','-c','source /tmp/ab/fn.sh; run hog1'])
for h in hogs: h.kill()
"
