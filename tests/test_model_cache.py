"""The KV-cache keyword follows the decoder's signature (transformers renamed it within 5.x)."""

from llava_edge.model.cache import cache_kwargs


class _Old:
    def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):
        pass


class _New:
    def forward(self, inputs_embeds=None, cache=None, use_cache=None, **kwargs):
        pass


def test_cache_keyword_follows_the_forward_signature():
    cache = object()
    assert cache_kwargs(_Old(), cache) == {"past_key_values": cache}
    assert cache_kwargs(_New(), cache) == {"cache": cache}


def test_installed_transformers_decoder_takes_the_chosen_keyword_without_warning(recwarn):
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=8)
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(inputs_embeds=torch.randn(1, 3, 16), use_cache=True, **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 3  # the cache we passed is the one filled
    assert not [w for w in recwarn if "deprecated" in str(w.message)]
