"""
Pretrained models from the Hugging Face hub, which the TinyStories protocol finetunes:

    from pretrained.load import from_pretrained
    model = from_pretrained("roneneldan/TinyStories-1Layer-21M")   # a GPT-Neo, as model.py's GPT

load.py: config.json and the weights (safetensors or .bin) mapped to model.py's GPTConfig and parameter
names; hub.py: the downloader (resumable, checksummed, cached), also of the TinyStories text.
"""
