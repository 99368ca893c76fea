"""Rotary-angle distributions, disturbance, and closed-form bounds."""
