"""Layer 3, training: the masked update that keeps frozen entries bit-identical, SFT
data, probes and staged training (HF Trainer).

* ``freeze``    ``MaskedUpdate``: frozen entries stay bit-identical under any optimizer
* ``data``      SFT examples: load, encode with the chat template, collate
* ``finetune``  one fine-tune (probe or stage), probes of several tasks, staged training
"""
