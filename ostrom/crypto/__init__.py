"""Keys, signatures and content ids: the cryptographic primitives every layer shares."""
