"""Put CLEX into a (tiny, random) LLaMA, look at θ(t), save and load it. Runs in seconds on a CPU."""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import clex

config = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)
model = clex.apply_clex(LlamaForCausalLM(config).eval(), clex.CLEXConfig(max_factor=16))
rotary = clex.get_clex_rotary(model)
for t in (1, 2, 4, 16):
    print(f"t={t:>2}: θ(t)[:4] = {rotary.inv_freq_at(t)[:4].tolist()}")
ids = torch.randint(0, 256, (1, 600))  # 600 tokens = 4.7 x L
with torch.no_grad():
    logits = model(ids).logits
print("t used for 600 tokens:", rotary.last_t.tolist())
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    again = clex.load_model(folder).eval()
    with torch.no_grad():
        print("save/load identical:", torch.equal(again(ids).logits, logits))
