"""FLUX.1 Kontext: loaders, conditioning, the training loss and predict."""
