"""Released files: verified downloads into a local cache, and the released models by name
(``from_pretrained``)."""
