"""Offline tools: the replay and its report, labelled pairs, tiny model builders."""
