#!/usr/bin/env bash
# Regenerates every number in docs/results.md: the whole pipeline (`ibasis run`) on the five
# published modular-addition models (reference split, test accuracy, delta 0.001) and on the
# published MNIST MLP, then prints the tables as markdown.
#   scripts/results.sh            # runs everything (release build), then prints the tables
#   scripts/results.sh --tables   # prints the tables from existing out/results/*/summary.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--tables" ]; then
    cargo build --release --quiet
    for s in 0 1 2 3 4; do
        ./target/release/ibasis run configs/published-modadd-lib.toml \
            --model "../shared/reference/modadd/seed$s/model_epoch_60000.pt" --out "out/results/seed$s"
    done
    ./target/release/ibasis run configs/mnist-lib.toml --out out/results/mnist
fi
python3 - <<'PY'
import json, os
rows = []
def load(name):
    p = f"out/results/{name}/summary.json"
    return json.load(open(p)) if os.path.exists(p) else None
print("| seed | test accuracy | features ln1.0 (LIB / PCA / neurons) | ln2.0 | unembed | edges ln1.0->ln2.0 (LIB / PCA) | ln2.0->unembed | unembed->output | key frequencies (ln2.0) | Leiden modules (Q) | pipeline time (s) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for s in range(5):
    j = load(f"seed{s}")
    if j is None:
        continue
    f = {k: " / ".join("-" if n is None else str(n) for _, n in v) for k, v in j["features_required"]}
    e = {k: " / ".join(str(n) for _, n in v) for k, v in j["edges_required"]}
    fr = dict((k, v) for k, v in j["frequencies"])
    t = dict(j["timings"])["total"]
    print(f"| {s} | {j['baseline']:.6f} | {f['ln1.0']} | {f['ln2.0']} | {f['unembed']} | {e['ln1.0/ln2.0']} | {e['ln2.0/unembed']} | {e['unembed/output']} | {', '.join(map(str, fr.get('ln2.0', [])))} | {j['n_modules']} ({j['modularity_q']:.3f}) | {t:.0f} |")
j = load("mnist")
if j is not None:
    print()
    print("| MNIST MLP | test accuracy | features layers.0 (LIB / PCA / neurons) | layers.1 | layers.2 | edges layers.0->1 (LIB / PCA) | layers.1->2 | layers.2->output | Leiden modules (Q) | pipeline time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    f = {k: " / ".join("-" if n is None else str(n) for _, n in v) for k, v in j["features_required"]}
    e = {k: " / ".join(str(n) for _, n in v) for k, v in j["edges_required"]}
    t = dict(j["timings"])["total"]
    print(f"| published | {j['baseline']:.4f} | {f['layers.0']} | {f['layers.1']} | {f['layers.2']} | {e['layers.0/layers.1']} | {e['layers.1/layers.2']} | {e['layers.2/output']} | {j['n_modules']} ({j['modularity_q']:.3f}) | {t:.0f} |")
PY
