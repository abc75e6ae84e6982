#!/bin/sh
# The committed benchmark: 100 CounterFact-form cases made from PARAREL dev (pararel-dev-counterfact.json, made
# with the command below), knowledge-neuron updates scored with ROME's CounterFact protocol. Run from the
# repository root; run it again to resume (finished cases are read from docs/benchmarks/pararel-dev-rome/cases).
#   kn facts to-counterfact --facts /work/shared/pararel-dev --output docs/benchmarks/pararel-dev-counterfact.json \
#      --per-relation 5 --seed 0 --max-paraphrases 2
exec python -m kn_core.cli bench docs/benchmarks/pararel-dev-counterfact.json --edit update --protocol rome \
    --cases 100 --seed 0 --quadrature gauss --generation-prompts 1 --gen-tokens 40 \
    --out docs/benchmarks/pararel-dev-rome "$@"
