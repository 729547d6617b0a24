"""truepolicy's SGLang plugin: the server side of the on-policy numerics contract.

``server_patches.plugin.load_plugin`` is registered under SGLang's ``sglang.srt.plugins`` entry-point
group, so SGLang calls it in every one of its processes. It does nothing unless
``TRUEPOLICY_ON_POLICY=1`` (set by ``truepolicy server``), so installing truepolicy never changes
somebody else's SGLang server.
"""
