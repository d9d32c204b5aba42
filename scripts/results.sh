#!/usr/bin/env bash
# Regenerates every number in docs/results.md: the whole pipeline (`ibasis run`) on the five
# published modular-addition models (reference split, test accuracy, delta 0.001) and on the
# published MNIST MLP, then prints the tables as markdown.
#   scripts/results.sh            # runs everything (release build), then prints the tables
#   scripts/results.sh --tables   # prints the tables from existing out/results/*/summary.json
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    ""|--tables) ;;
    # The language-model jobs below.
    *) skip_published=1 ;;
esac
if [ -z "${skip_published:-}" ] && [ "${1:-}" != "--tables" ]; then
    cargo build --release --quiet
    for s in 0 1 2 3 4; do
        ./target/release/ibasis run configs/published-modadd-lib.toml \
            --model "../shared/reference/modadd/seed$s/model_epoch_60000.pt" --out "out/results/seed$s"
    done
    ./target/release/ibasis run configs/mnist-lib.toml --out out/results/mnist
    # The paper's modularity recipe on seed 0 (docs/results.md).
    ./target/release/ibasis modularity --graph out/results/seed0/lib \
        --norm log-bisect:out/results/seed0/lib/ablation-edges/ablation.json \
        --gamma 0.1,0.5,1,2 --nodes-per-layer 30 --seed 3
fi
if [ -z "${skip_published:-}" ]; then
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
fi

# SmolLM2-135M (scripts/fetch-data.sh smollm2 && scripts/fetch-data.sh text first):
#   scripts/results.sh --smollm2          # plan, then the whole pipeline into out/smollm2
#   scripts/results.sh --smollm2-tables   # the tables from out/smollm2
if [ "${1:-}" = "--smollm2" ]; then
    cargo build --release --quiet
    ./target/release/ibasis plan configs/smollm2-lib.toml | tee out/smollm2-plan.txt
    /usr/bin/time -v ./target/release/ibasis run configs/smollm2-lib.toml --out out/smollm2 \
        2>&1 | tee out/smollm2-run.log
fi
if [ "${1:-}" = "--smollm2" ] || [ "${1:-}" = "--smollm2-tables" ]; then
python3 - <<'PY'
import json
g = json.load(open("out/smollm2/lib/graph.json"))
p = json.load(open("out/smollm2/pca/graph.json"))
print("| node layer | positions | original | LIB kept | PCA kept | leading LIB Lambdas |")
print("|---|---|---|---|---|---|")
pca_kept = {l["name"]: l["d_lib"] for l in p["node_layers"]}
for l in g["node_layers"]:
    lead = ", ".join(f"{v:.4g}" for v in l["leading_lambda"][:3])
    print(f"| {l['name']} | {l['positions']} | {l['d_orig']} | {l['d_lib']} | {pca_kept.get(l['name'], '-')} | {lead} |")
print()
print("| edges | shape | total |")
print("|---|---|---|")
for e in g["edges"]:
    print(f"| {e['in_layer']} -> {e['out_layer']} | {e['shape'][0]} x {e['shape'][1]} | {e['total']:.4g} |")
print()
print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in g["timings"]))
lib = json.load(open("out/smollm2/lib/ablation-nodes/ablation.json"))
pca = json.load(open("out/smollm2/pca/ablation-nodes/ablation.json"))
print()
print(f"Held-out cross-entropy, unablated: {lib['baseline']:.4f} nats")
print()
print("| node layer | kept | LIB | PCA |")
print("|---|---|---|---|")
for name, c in lib["node_layers"].items():
    q = pca["node_layers"].get(name)
    for n, s in zip(c["n_kept"], c["score"]):
        ps = "-"
        if q and n in q["n_kept"]:
            ps = f"{q['score'][q['n_kept'].index(n)]:.3f}"
        print(f"| {name} | {n} | {s:.3f} | {ps} |")
PY
fi

# All 30 blocks of SmolLM2-135M (configs/smollm2-full-lib.toml; ~74 min to build at its 64 chunks
# on 2 cores, see docs/results.md). An optional chunk count runs the same config on fewer chunks:
#   scripts/results.sh --smollm2-full [CHUNKS]        # plan, then the pipeline into out/smollm2-full[-CHUNKS]
#   scripts/results.sh --smollm2-full-tables DIR      # the tables from DIR
if [ "${1:-}" = "--smollm2-full" ]; then
    cargo build --release --quiet
    cfg=configs/smollm2-full-lib.toml
    out=out/smollm2-full
    if [ -n "${2:-}" ]; then
        mkdir -p out
        cfg=out/smollm2-full-lib-$2.toml
        out=out/smollm2-full-$2
        sed -e "s/^n_samples = 64$/n_samples = $2/" configs/smollm2-full-lib.toml > "$cfg"
    fi
    ./target/release/ibasis plan "$cfg" | tee "$out-plan.txt"
    /usr/bin/time -v ./target/release/ibasis run "$cfg" --out "$out" 2>&1 | tee "$out-run.log"
    set -- --smollm2-full-tables "$out"
fi
if [ "${1:-}" = "--smollm2-full-tables" ]; then
OUT="${2:-out/smollm2-full}" python3 - <<'PY'
import json, os
out = os.environ["OUT"]
g = json.load(open(f"{out}/lib/graph.json"))
p = json.load(open(f"{out}/pca/graph.json"))
pca_kept = {l["name"]: l["d_lib"] for l in p["node_layers"]}
layers = {l["name"]: l for l in g["node_layers"]}
stage = {k[len("stage "):]: v for k, v in g["timings"] if k.startswith("stage ")}
edges = {e["in_layer"]: e for e in g["edges"]}
print("| block | ln1 kept (LIB / PCA) | ln1 leading Lambdas | ln2 kept (LIB / PCA) | ln2 leading Lambdas | edges ln1->ln2 / ln2->ln1 (total) | seconds: metric ln1, ln2; edges ln1, ln2 |")
print("|---|---|---|---|---|---|---|")
k = 0
while f"ln1.{k}" in layers:
    a, b = layers[f"ln1.{k}"], layers[f"ln2.{k}"]
    # Lambda[0] belongs to the constant direction where the layer has one.
    lead = lambda l: ", ".join(f"{v:.4g}" for v in l["leading_lambda"][int(l["has_constant"]):][:3])
    ea, eb = edges.get(f"ln1.{k}"), edges.get(f"ln2.{k}")
    tot = lambda e: f"{e['total']:.4g}" if e else "-"
    secs = [stage.get(s, 0.0) for s in (f"metric.ln1.{k}", f"metric.ln2.{k}", f"edges.ln1.{k}", f"edges.ln2.{k}")]
    print(f"| {k} | {a['d_lib']} / {pca_kept.get(a['name'], '-')} | {lead(a)} | {b['d_lib']} / {pca_kept.get(b['name'], '-')} | {lead(b)} | {tot(ea)} / {tot(eb)} | " + ", ".join(f"{s:.0f}" for s in secs) + " |")
    k += 1
print()
print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in g["timings"] if not k.startswith("stage ")))
lib = json.load(open(f"{out}/lib/ablation-nodes/ablation.json"))
pca = json.load(open(f"{out}/pca/ablation-nodes/ablation.json"))
print()
print(f"Held-out cross-entropy, unablated: {lib['baseline']:.4f} nats")
print()
names = list(lib["node_layers"])
ns = lib["node_layers"][names[0]]["n_kept"]
print("| node layer | " + " | ".join(f"n = {n} (LIB / PCA)" for n in ns) + " |")
print("|---|" + "---|" * len(ns))
for name in names:
    c, q = lib["node_layers"][name], pca["node_layers"].get(name)
    cells = []
    for n, s in zip(c["n_kept"], c["score"]):
        ps = f"{q['score'][q['n_kept'].index(n)]:.3f}" if q and n in q["n_kept"] else "-"
        cells.append(f"{s:.3f} / {ps}")
    print(f"| {name} | " + " | ".join(cells) + " |")
s = json.load(open(f"{out}/summary.json"))
print()
print(f"Leiden: {s['n_modules']} modules, Q = {s['modularity_q']:.3f}")
print("pipeline timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["timings"]))
PY
fi
