"""Published weights in: a Lightning-style checkpoint of the published code becomes our export, and
the compatibility mode evaluates with the published blocking."""

import torch

from data_shards.collate import load_tokenizer
from data_shards.folder import ShardFolder
from data_shards.stream import OrderedStream, make_loader
from eval.encode import encode_side
from model.factory import make_collator
from model.mmoe import build_model
from tests.support.published_checkpoint import tiny_config


def test_compat_evaluation_computes_each_side_on_the_published_blocks(tiny_shards):
    cfg = tiny_config(tiny_shards)
    torch.manual_seed(0)
    model, cfg = build_model(cfg, load_tokenizer(tiny_shards / "tokenizer"))
    model.eval()
    collator = make_collator(cfg, model)
    kb_stream = OrderedStream(ShardFolder(cfg.data.shards), "kb", collator, 16, 1, 0)
    device = torch.device("cpu")

    def encode(block):
        return encode_side(model, make_loader(kb_stream, 0), device, entity=True, block=block)[0]

    blocked = encode(7)
    # Reference: features of the whole KB, then the matcher's entity side on rows 0-6, 7-13, ...
    with torch.no_grad():
        feats = [model.features({k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")})
                 for b in make_loader(kb_stream, 0)]
        from moe.features import Features

        allf = Features.cat(feats)
        ref = [model.matcher.entity_side(allf.index(slice(s, s + 7)))[0] for s in range(0, len(allf), 7)]
    for key in blocked.tensors:
        torch.testing.assert_close(blocked[key], torch.cat([r[key] for r in ref]), rtol=0, atol=0, msg=key)
    # Another blocking gives other numbers: that is the published evaluation's batch dependence.
    assert (encode(16)["text.g"] - blocked["text.g"]).abs().max() > 1e-4
    # The default model ignores the blocking.
    torch.manual_seed(0)
    default, _ = build_model(tiny_config(tiny_shards, compat="none"), load_tokenizer(tiny_shards / "tokenizer"))
    default.eval()
    a = encode_side(default, make_loader(kb_stream, 0), device, entity=True, block=7)[0]
    b = encode_side(default, make_loader(kb_stream, 0), device, entity=True)[0]
    torch.testing.assert_close(a["text.g"], b["text.g"], rtol=1e-5, atol=1e-5)
