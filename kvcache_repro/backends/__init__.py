"""What knows the libraries' APIs: caches, models, generation, quantizers, quanto's C++ extension."""
