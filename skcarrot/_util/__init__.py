"""Shared private helpers: numerics, progress, threads, splits, input checks, the predict mixin."""
