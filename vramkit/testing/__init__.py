"""Test utilities shipped with vramkit: tiny local models and a scripted fake device."""
