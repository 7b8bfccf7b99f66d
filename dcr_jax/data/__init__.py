"""Prompt sets: loaders, registry, tokenisation and sampling."""
