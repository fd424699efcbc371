// Checkout: the card number goes from this browser to the payment gateway, never to the
// shop. The gateway answers with a token (as a processor's browser SDK does), and the
// form posts the token in the number's place.
(function () {
  "use strict";
  const form = document.getElementById("checkout-form");
  if (!form) return;
  const card = document.getElementById("card");
  const token = form.querySelector('input[name="card_token"]');
  const error = document.getElementById("card-error");
  const button = form.querySelector('button[type="submit"]');
  const UNAVAILABLE =
    "The payment processor cannot be reached right now. Nothing was ordered; try again in a moment.";
  let busy = false;

  function show(message) {
    error.textContent = message;
    error.hidden = false;
    card.setAttribute("aria-invalid", "true");
    card.focus();
  }

  async function tokenize() {
    let response;
    try {
      response = await fetch(form.dataset.tokensUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ card: card.value.replace(/[ -]/g, "") }),
      });
    } catch (exc) {
      return { message: UNAVAILABLE };
    }
    const data = await response.json().catch(() => ({}));
    if (response.ok && data.id) return { token: data.id };
    if (response.status >= 500 || response.status === 429) return { message: UNAVAILABLE };
    return { message: (data.error && data.error.message) || "Check the card number." };
  }

  form.addEventListener("submit", async (event) => {
    // A token already (back and submit again): the form's idempotency key lands the
    // second submit on the order the first one placed.
    if (token.value) return;
    event.preventDefault();
    if (busy) return; // a double click while the gateway answers
    busy = true;
    button.disabled = true;
    const result = await tokenize();
    if (result.token) {
      token.value = result.token;
      form.submit(); // no submit event: this handler does not run again
      return;
    }
    show(result.message);
    busy = false;
    button.disabled = false;
  });
})();
