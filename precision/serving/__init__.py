"""Serving-configuration parity: does the configuration users deploy compute what the eager capture computes?"""
