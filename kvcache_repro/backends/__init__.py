"""What knows the libraries' APIs: building caches and models, generating through them, quantizing, quanto's C++ extension."""
