"""Print the engine-vs-official-structure parity errors the tests bound (tiny checkpoint, CPU float32).

PYTHONPATH=. python bench/engine_parity_numbers.py
"""

import tempfile

import numpy as np
import torch

from engine import load_engine, make_checkpoint
from engine.prompts import REFINE_SYSTEM_PROMPT
from tests.engine.official_reference import Reference
from tests.engine.test_parity import REQUESTS, _context_kv, _reference_contexts, _rel

torch.set_num_threads(1)
eng = load_engine(
    make_checkpoint(tempfile.mkdtemp() + "/m", "tiny", seed=3), device="cpu", attention="reference"
)
sys_len = len(eng.tokenizer.encode(REFINE_SYSTEM_PROMPT)) + 2
states = eng.prepare(REQUESTS)
kv_err = {}
for st in states:
    ref = Reference(eng, st.weights.name)
    ctxs, gen = _reference_contexts(ref, st.request)
    kv_err[st.request.task] = max(
        _rel(_context_kv(eng, st, n, layer, sys_len), c.keys[layer])
        for n, c in ctxs.items()
        if c.kv_len
        for layer in range(eng.cfg.llm.num_hidden_layers)
    )
    h, w = st.grid
    st.reference = ref.sample(
        ctxs, torch.randn(h * w, eng.cfg.latent_channels, generator=gen), h, w, st.request.params
    )
while not all(s.done for s in states):
    eng.step(states)
for st in states:
    lat = _rel(st.x, st.reference)
    out = eng.finish(st)
    ref_img = np.asarray(eng._decode(eng._unpatchify(st, st.reference.float())), dtype=int)
    print(
        f"{st.request.task:9s} max KV rel err {kv_err[st.request.task]:.2e}  final latent rel err {lat:.2e}  max image diff {np.abs(np.asarray(out.image, dtype=int) - ref_img).max()} levels"
    )
