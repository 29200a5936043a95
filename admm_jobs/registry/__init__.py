"""The model registry: the model artifact (:mod:`.model`) and the registry's pointer, versions and decision
history (:mod:`.store`)."""
