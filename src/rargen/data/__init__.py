"""Data: image sources (digits, folders, .npz), preprocessing, the token store (written by
``pretokenize``, read by ``TokenStore``), the loader, and the embedded digits."""
