# The CPU-scale latent pipeline as measured (benchmarks/results/latents_digits), from the repository root:
set -e
export OMP_NUM_THREADS=1
P=.venv/bin/python
$P benchmarks/tiny_vae.py --out vae-digits                      # 600 steps x 64 (results/tiny_vae.json)
$P -m flowmaps encode --vae vae-digits --preset digits --out lat --quiet
$P -m flowmaps train --preset latents data.path=lat --objective lsd --out run train.steps=1500 \
    train.lr_decay_start=400 train.checkpoint_every=1500 train.threads=1 --quiet
$P -m flowmaps evaluate run --out eval --steps 1,2,4 --n 1000 eval.classifier_steps=1500
