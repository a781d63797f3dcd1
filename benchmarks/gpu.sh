#!/usr/bin/env bash
# The GPU checks in one device call (see ../shared/gpu/README.md): the CUDA probe test, the trainer path
# against a plain loop, and a swarm of two peers sharing the GPU against one process using it alone.
#   bash ../shared/gpu/wheels.sh            # here, once
#   device run: command "bash benchmarks/gpu.sh", carry [".whl"]; results land in $OUT
set -uo pipefail
OUT=${OUT:-/tmp/hivefold-gpu}
mkdir -p "$OUT"
source .whl/prologue.sh
exec > >(tee "$OUT/gpu.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, hivemind; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hivemind', hivemind.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_device.py tests/unit/test_proof.py 2>&1 | tail -3
# a proof's cost on the GPU (the peer's record, the keeper's replay on the same GPU) at the time-to-loss run's shapes
timeout 120 python3 benchmarks/proof_replay.py --device cuda --keeper-device cuda --model small --seq-len 128 \
    --micro-batch 128 --batches 8 --json "$OUT/proof_replay.json"
# 32-step segments at the time-to-loss run's rate, where the H200's replays (then in quarter-size chunks) drifted 35-60 %
# from honest end states: at the peer's own shapes, and with torch's deterministic algorithms on both sides
for det in "" --deterministic; do
  timeout 100 python3 benchmarks/proof_replay.py --device cuda --keeper-device cuda --model small --seq-len 128 \
      --micro-batch 256 --batches 64 --segments 2 --warmup 40 --lr 3e-3 $det --json "$OUT/proof_replay_long$det.json"
done
# ... and by a keeper without a GPU, which replays a GPU peer's segment in the CPU's bf16
timeout 150 python3 benchmarks/proof_replay.py --device cuda --keeper-device cpu --model small --seq-len 128 \
    --micro-batch 128 --batches 4 --segments 2 --json "$OUT/proof_replay_cpu_keeper.json"
# DT_SECONDS=0 skips the trainer-path check; TTL_CORPUS=site trains on 300 MB of the image's site-packages (a corpus
# the GPU cannot exhaust in minutes; the standard library is 10 M tokens, a pass every 5 s).
[[ ${DT_SECONDS:-12} != 0 ]] && timeout 150 python3 benchmarks/device_throughput.py --device cuda --models small base --seq-len 512 --micro-batch 32 \
    --seconds ${DT_SECONDS:-12} --json "$OUT/device_throughput.json"
# Rounds of ~64k samples: at GPU speed a CPU-sized round (512 samples) would be a few milliseconds. Checks off by
# default (TTL_VERIFY_CEILING=0; set it empty for the coordinator's own): README, "Verified work".
vc=${TTL_VERIFY_CEILING-0}
verify=()
[[ -n $vc ]] && verify=(--verify-ceiling "$vc")
corpus=(--corpus stdlib)
[[ ${TTL_CORPUS:-stdlib} == site ]] && corpus=(--corpus "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" --max-corpus-mb 300)
timeout ${TTL_TIMEOUT:-330} python3 benchmarks/time_to_loss.py --device cuda --model small --seconds ${TTL_SECONDS:-100} "${corpus[@]}" \
    --inner-steps 8192 --warmup-steps 200 --decay-steps 200000 --single-batch auto --shard-sequences 1024 --checkpoint-every 2 \
    --eval-every 5 "${verify[@]}" --json "$OUT/time_to_loss.json" --plot "$OUT/time_to_loss.png" --keep
cp -r /tmp/hivefold-ttl-*/*.log "$OUT/" 2>/dev/null
grep -h "verified lease" "$OUT"/*.log | tail -5
grep -hc "verified lease" "$OUT"/coordinator.log
grep -h "micro-batch" "$OUT"/peer*.log | grep -i auto | head -4
echo done
