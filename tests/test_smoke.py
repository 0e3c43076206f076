from prefill_router.cli import main


def test_cli_help_lists_commands(capsys):
    assert main([]) == 2
    assert "prefill-router" in capsys.readouterr().out


def test_tiny_encoder_loads(tiny_encoder_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(tiny_encoder_dir)
    assert model.config.num_hidden_layers == 2
