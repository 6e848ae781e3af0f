"""Hand-written noisy documents: the problems native alignment exists to fix.

All phone numbers, e-mail addresses, domains and discount codes are invented. The offensive passages
are deliberately mild (forum insults, a stereotype, harsh wording): what a moderation pass must catch.
Each list holds (lang, text) pairs.
"""
from __future__ import annotations

ADS: list[tuple[str, str]] = [
    ("ar", "🔥🔥 عرض لا يتكرر!! خصم 70% على جميع العطور الفرنسية الأصلية لفترة محدودة جدًا. اطلب الآن قبل نفاد الكمية واستخدم كود الخصم SAVE70 عند الدفع. التوصيل مجاني لجميع مدن المملكة!!! اتصل الآن: 0551234567"),
    ("ar", "اتصل الآن واحصل على استشارة مجانية! نحن الأفضل في نقل العفش داخل الرياض وخارجها، فك وتركيب وتغليف بأرخص الأسعار. عمالة مدربة وسيارات مغلقة. واتساب: +966 50 123 4567 — خدمة 24 ساعة."),
    ("ar", "تخسيس بدون رجيم ولا رياضة!! كبسولات طبيعية 100% تنزل وزنك 10 كيلو في أسبوعين فقط. آلاف العملاء جربوها ونجحت معهم. اطلب العلبة الثانية مجانًا اليوم فقط. للطلب راسلنا على الخاص."),
    ("ar", "أقوى عروض الجمعة البيضاء: شاشات 55 بوصة بسعر 999 ريال فقط، وجوالات بخصم يصل إلى 50%. العرض ساري حتى منتصف الليل. استخدم الكود BLACK23 لخصم إضافي 10%. تسوق الآن!!"),
    ("ar", "هل تبحث عن دخل إضافي من المنزل؟ اربح 5000 دولار شهريًا من التداول بدون أي خبرة! انضم لقناتنا وسنرسل لك توصيات مضمونة الربح 100%. الأماكن محدودة، سجل اسمك الآن."),
    ("ar", "مطعم الذواقة يقدم لكم عرض العائلة: 2 دجاج مشوي + رز + سلطة + مشروب بـ 59 ريال فقط! العرض يوميًا من 12 ظهرًا حتى 4 عصرًا. اطلب عبر التطبيق واستخدم كود YUMMY15. لا تفوّت الفرصة!!!"),
    ("ar", "دورات اللغة الإنجليزية أونلاين مع مدرسين معتمدين، تعلم المحادثة في 30 يوم وإلا نرجع لك فلوسك! سجل اليوم واحصل على الشهر الأول مجانًا. للتسجيل أرسل كلمة \"انجليزي\" إلى الرقم 0501112233."),
    ("ar", "عيادات النخبة لتجميل الأسنان: تبييض بالليزر بـ 499 ريال بدلًا من 1200، وتقويم شفاف بالتقسيط بدون فوائد. احجز موعدك الآن، العرض لأول 50 عميل فقط. اتصل: 920012345"),
    ("ar", "شقق فندقية للإيجار اليومي والشهري بأسعار منافسة، قريبة من الحرم. غرف نظيفة وخدمة واي فاي مجانية. احجز الآن ووفر 30%!! للتواصل: 0126543210 أو واتساب 0569876543"),
    ("ar", "مبروك!! لقد ربحت جوال آيفون جديد 🎁 اضغط على الرابط وأدخل بياناتك لاستلام الجائزة خلال 24 ساعة. العرض للفائزين المختارين فقط، لا تشارك الرسالة مع أحد."),
    ("ar", "أحسن مكتب استقدام في جدة! عاملات منزليات من جميع الجنسيات، إجراءات سريعة وضمان ثلاثة أشهر. خصم خاص لعملائنا القدامى. اتصل الآن على 0122223344 ولا تتردد."),
    ("ar", "مكيفات سبليت بأقل سعر في السوق مع التركيب المجاني!! ضمان 10 سنوات على الكمبروسر. العرض لفترة محدودة، سارع بالحجز قبل دخول الصيف. 📞 0533334444"),
    ("en", "LIMITED TIME OFFER!!! Get 80% OFF all designer watches today only. Use code WATCH80 at checkout. Free worldwide shipping!!! Click now before stock runs out. Call +971 50 987 6543."),
    ("en", "Work from home and earn $3,000 a week with no experience needed! Our proven system has helped thousands. Sign up today and get your starter kit FREE. Spaces are limited - act NOW!"),
    ("en", "Congratulations! You have been selected to receive a $500 gift card. To claim your reward, reply with your full name, address and card number within 24 hours."),
    ("en", "Best cleaning services in Dubai!!! Deep cleaning, sofa shampooing and pest control at the lowest prices. Book today and get 25% off with code CLEAN25. WhatsApp us: +971 55 321 0987"),
    ("mixed", "عرض خاص من SuperMart!! خصم 50% على كل products الإلكترونيات this weekend only. Use code SUPER50 واستمتع بالتوصيل المجاني free delivery لجميع الطلبات فوق 200 ريال. Order now!!"),
    ("mixed", "Best VPN 2024 🔥 أسرع VPN في الشرق الأوسط، اشترك الآن واحصل على 3 أشهر FREE!! يدعم Netflix و all streaming apps. Download now من الرابط في البايو."),
    ("mixed", "Crypto signals مضمونة 100%!!! انضم لقناة VIP واربح يوميًا بدون خبرة. Limited seats، اشترك الآن بـ 99$ فقط بدلًا من 299$. DM for details."),
    ("mixed", "Sale Sale Sale!!! تخفيضات نهاية الموسم على الأحذية الرياضية Nike وAdidas حتى 60%. Offer valid till Friday. تسوق أونلاين واستخدم code RUN60."),
    ("ar", "مركز التفوق للتدريب يعلن عن بدء التسجيل في دوراته الصيفية!! دورات في البرمجة والتصميم واللغة الإنجليزية والمحاسبة، بشهادات معتمدة دوليًا. سجل الآن واحصل على خصم 40% لأول 100 مشترك فقط، واستخدم كود SUMMER40 للحصول على خصم إضافي. الدورات حضورية في الرياض وجدة والدمام وأونلاين لجميع الدول العربية. المقاعد محدودة جدًا والتسجيل يغلق قريبًا!!! للتسجيل والاستفسار اتصل الآن على 920055667 أو واتساب +966 54 321 7788، وتابعونا على حساباتنا لمعرفة آخر العروض."),
    ("ar", "أقوى عرض على باقات الإنترنت المنزلي 🔥 سرعة 500 ميجا بـ 199 ريال شهريًا فقط بدلًا من 349، مع راوتر مجاني وتركيب خلال 24 ساعة! العرض للمشتركين الجدد ولفترة محدودة. حول الآن واحصل على شهرين مجانًا!! لا تفوت الفرصة، الكمية محدودة. اتصل على 0112345678 أو أرسل رسالة نصية بكلمة \"ألياف\" إلى 88123."),
]

CONTACT: list[tuple[str, str]] = [
    ("ar", "للإيجار شقة عائلية في حي الياسمين بالرياض، ثلاث غرف نوم وصالة ومطبخ راكب ودورتا مياه، الدور الثاني مع مصعد. الإيجار السنوي 45 ألف ريال على دفعتين. للتواصل مع المالك أبو فهد: 0554443322 أو على البريد abufahad.rent@gmail.com"),
    ("ar", "مدرس رياضيات خبرة 15 سنة يعطي دروسًا خصوصية لطلاب الثانوية والقدرات والتحصيلي، حضوريًا في جدة أو أونلاين. النتائج مضمونة بإذن الله. جوال: +966 56 789 0123، إيميل: math.teacher.jed@hotmail.com"),
    ("ar", "سيارة للبيع موديل 2018، ممشى 120 ألف كيلو، صيانة دورية في الوكالة، بدون حوادث. السعر 52 ألف قابل للتفاوض البسيط. الجادين فقط يتواصلون على الرقم 0507654321 بعد العصر."),
    ("ar", "مطلوب محاسب بخبرة لا تقل عن ثلاث سنوات للعمل في شركة تجارية بالقاهرة، يفضل من لديه خبرة في برامج المحاسبة. يرجى إرسال السيرة الذاتية إلى hr@nile-trading.com.eg أو الاتصال على 01012345678."),
    ("ar", "شقة للبيع في التجمع الخامس، مساحة 165 مترًا، تشطيب سوبر لوكس، الدور الثالث، قريبة من الخدمات. للاستفسار: أ. محمود 01123456789 أو 01298765432 (واتساب فقط)."),
    ("ar", "أقدم خدمات الترجمة المعتمدة من الإنجليزية إلى العربية وبالعكس للوثائق الرسمية والأبحاث الجامعية، مع الالتزام بالمواعيد. تواصلوا معي عبر البريد translator.sara@yahoo.com أو الهاتف +20 100 555 7788."),
    ("ar", "فقدت محفظة جلد بنية اللون يوم الخميس في مجمع تجاري بدبي، وفيها بطاقة هوية ورخصة قيادة. أرجو ممن يجدها التواصل معي على الرقم +971 50 246 8135، وله مكافأة."),
    ("ar", "مركز صيانة أجهزة منزلية في الشارقة: غسالات وثلاجات ومكيفات، زيارة منزلية خلال ساعة. هاتف المركز 06 555 1234 وجوال 052 777 8899، البريد service@sharjah-fix.ae"),
    ("ar", "مرحبًا، أنا منسقة رحلات للعمرة من مصر، برامج اقتصادية وفندقية قريبة من الحرم. للحجز كلموني على 01555667788 أو ابعتوا رسالة على الإيميل umrah.trips.eg@gmail.com"),
    ("ar", "للتبرع بالأجهزة الكهربائية المستعملة لصالح الأسر المحتاجة، يرجى التواصل مع منسق الجمعية الأستاذ خالد على الرقم 0138765432 تحويلة 210، أو عبر البريد donate@khair-society.org.sa"),
    ("en", "Room available for rent in a shared flat in Dubai Marina, fully furnished, bills included, AED 3,500 per month. Female professionals only. Contact Lina on +971 52 135 7924 or lina.marina.rooms@gmail.com."),
    ("en", "Private tutoring in physics and chemistry for IGCSE and A-level students in Cairo. Ten years of experience. Call or WhatsApp 0100 987 6543, or email dr.hany.tutor@outlook.com for a free trial lesson."),
    ("mixed", "Freelance graphic designer متاح لتصميم الشعارات والهويات البصرية وبوستات السوشيال ميديا. Portfolio on request. للتواصل: designer.omar@gmail.com | WhatsApp: +966 59 111 2233"),
]

URL_SPAM: list[tuple[str, str]] = [
    ("ar", "حمل أحدث الأفلام والمسلسلات مجانًا بجودة عالية من هنا http://www.aflam-free-hd.net/download?id=8841 وهنا http://bit.ly/3xYz9Qw وللمزيد زوروا www.aflam-free-hd.net/new — روابط مباشرة بدون إعلانات!!"),
    ("ar", "أفضل موقع لتحميل البرامج المكركة: http://crack-soft-arab.com ✅ http://crack-soft-arab.com/windows ✅ http://crack-soft-arab.com/office ✅ كل البرامج مجانًا، شارك الرابط مع أصحابك."),
    ("ar", "تابعونا على جميع المنصات: https://instagram.com/offers_ksa_daily https://twitter.com/offers_ksa_daily https://t.me/offers_ksa_daily https://snapchat.com/add/offersksa لا تفوتكم العروض اليومية!!"),
    ("ar", "زيادة متابعين انستقرام حقيقيين 10 آلاف متابع بـ 50 ريال فقط!! اطلب من موقعنا https://followers-boost-sa.com/order واحصل على لايكات مجانية. رابط احتياطي: https://tinyurl.com/boost-sa-2"),
    ("ar", "اقرأ المزيد من الأخبار العاجلة على الرابط http://akhbar-3ajel.info/news/2023/08/17/item-55421.html وتابع البث المباشر على http://live.akhbar-3ajel.info/stream?ch=4 مجانًا."),
    ("ar", "رابط التسجيل في المنحة الدراسية الكاملة بدون شروط: http://scholarship-free-arab.xyz/apply?ref=9981 سجل قبل إغلاق الرابط، المقاعد محدودة!! شارك الرابط في جميع المجموعات."),
    ("en", "Cheap meds online no prescription needed!!! http://cheap-pharma-store.biz http://cheap-pharma-store.biz/order http://cheap-pharma-store.biz/discount Best prices guaranteed, discreet shipping."),
    ("en", "Click here to watch the full match live: http://stream-sports-hd.live/match?id=1123 backup link http://bit.ly/3kLmN0p no sign-up required, share with friends!"),
    ("mixed", "Download the full PDF book مجانًا من هنا: https://pdf-books-arabic.club/book/5532 أو من Google Drive https://drive-links-share.net/f/abc123 — free download لكل الكتب الجامعية!!"),
    ("mixed", "🔗 Links: https://shop-deals-me.com/ar/sale | https://shop-deals-me.com/ar/new | https://shop-deals-me.com/ar/top — أحدث العروض يوميًا، subscribe now!"),
    ("ar", "موقع مكتبة الكتب المجانية: تحميل مباشر لجميع الكتب الجامعية والروايات بصيغة PDF. الروايات: https://free-pdf-ar.site/novels الكتب الدينية: https://free-pdf-ar.site/religion كتب الطب: https://free-pdf-ar.site/medicine كتب الهندسة: https://free-pdf-ar.site/engineering الرابط الاحتياطي في حال الحجب: https://free-pdf-ar2.site — انشر الروابط في قروبات الواتساب ليستفيد الجميع!!"),
]

OFFENSIVE: list[tuple[str, str]] = [
    ("ar", "كاتب الموضوع: أرى أن المنتخب يحتاج إلى مدرب جديد بعد الخسارة الأخيرة.\nرد: كلامك غبي ولا يقوله إلا شخص جاهل ما يفهم في الكورة شي، روح اتفرج على كرتون أحسن لك.\nرد آخر: اهدأ يا أخي، الخلاف في الرأي لا يستدعي الإهانة."),
    ("ar", "يا فاشل، كل مرة تكتب نفس الكلام الفارغ في المنتدى. أحد يسكت هذا الأحمق، والله إنه مزعج وما عنده ذرة عقل."),
    ("ar", "المطعم هذا زبالة والعاملين فيه حرامية، يسرقون الزبائن بالأسعار ويقدمون أكل ما تأكله حتى القطط. صاحبه نصاب ولا أنصح أي أحد يدخله."),
    ("ar", "النساء أصلًا ما يعرفون يسوقون ولا يفهمون في السيارات، عشان كذا الزحمة كلها منهم. خلوهم في البيت أحسن."),
    ("ar", "أهل القرى كلهم متخلفون وما عندهم ذوق، أول ما يجون المدينة يخربون كل شي. هذا رأيي وما يهمني أحد."),
    ("ar", "رد على تعليق: أنت واحد تافه وما عندك شغل غير التعليق على الناس، روح دور لك شغلة تنفعك بدل ما تضيع وقتنا بكلامك السخيف."),
    ("ar", "هذا اللاعب أسوأ لاعب شفته في حياتي، حمار في الملعب ولا يعرف يمرر كرة. اللي جابه للفريق لازم يطرد معه."),
    ("ar", "الموظفين الأجانب في الشركة كلهم كسالى وما يشتغلون إلا إذا وقفت فوق رؤوسهم، ما أدري ليش يوظفونهم أصلًا."),
    ("ar", "مشرف المنتدى: تم حذف عدة ردود لاحتوائها على شتائم.\nعضو: حذفتوا ردي وخليتوا ردود هذا المعتوه؟ أنتم إدارة فاشلة ومنحازة، وهذا المنتدى صار مكب نفايات."),
    ("en", "Thread: Which phone has the best camera?\nReply: Only an idiot would buy that brand, seriously, are you stupid or just blind? Do some research before wasting everyone's time with your dumb questions."),
    ("en", "Old people should not be allowed to use the internet, they fall for every scam and clog up the comment sections with nonsense."),
    ("en", "This is the worst restaurant in town, the owner is a crook and the waiters are useless morons. Total garbage, avoid at all costs."),
    ("mixed", "Bro انت جد stupid؟ قلت لك ألف مرة الـ update فيه bugs، بس أنت ما تفهم. shut up وخلّ الناس اللي تفهم تتكلم."),
    ("ar", "الموضوع: أفضل مدينة للسكن في المملكة\nعضو 1: أنا أشوف أن المدينة الساحلية أفضل بسبب البحر والجو المعتدل في الشتاء.\nعضو 2: كلام فاضي، الساحل رطوبة وزحمة وناسه ما يعرفون النظام، ما يسكن هناك إلا اللي ما عنده خيار.\nعضو 1: يا أخي هذا رأيي، ليش تهاجم الناس؟\nعضو 2: لأنك ما تفهم، وكل اللي يدافعون عن هالمدينة نفس عقليتك الضيقة. روح اقرأ قبل ما تكتب.\nالمشرف: نرجو الالتزام بآداب الحوار وعدم التعميم على سكان أي مدينة."),
    ("ar", "تعليق على خبر زيادة الرسوم الدراسية: المسؤولين عن هالقرار ناس ما عندهم ضمير ولا يحسون بالناس، كل همهم جيوبهم. واللي يطبل لهم أسوأ منهم، قطيع يمشي ورا أي أحد. الله يرزقنا بناس تفهم."),
]

CLICKBAIT: list[tuple[str, str]] = [
    ("ar", "لن تصدق ما حدث لهذه الفتاة بعد أن شربت كوب ماء دافئ كل صباح!! النتيجة صادمة وستغير حياتك إلى الأبد... شاهد قبل الحذف 😱😱"),
    ("ar", "عاجل وخطير: 10 أسرار يخفيها عنك الأطباء ولا يريدونك أن تعرفها! السر رقم 7 سيصدمك، والأخير سيجعلك تعيد التفكير في كل ما تأكله."),
    ("ar", "فضيحة مدوية تهز الوسط الفني!! شاهد الفيديو الذي يبحث عنه الجميع الآن قبل أن يتم حذفه، ولن تصدق من يظهر في الدقيقة الثالثة!!!"),
    ("ar", "طريقة سحرية للتخلص من الكرش في 3 أيام فقط بدون رجيم! مكون واحد موجود في مطبخك يذيب الدهون فورًا، والأطباء في حالة ذهول."),
    ("ar", "هل تعلم لماذا يضع الطيارون الليمون في جيوبهم؟ السبب سيدهشك ولن تنساه أبدًا! تابع القراءة لتعرف الحقيقة الكاملة التي لم يخبرك بها أحد."),
    ("ar", "انهيار الأسعار غدًا!! خبراء يحذرون من كارثة اقتصادية ستضرب الجميع خلال أيام، وهذا ما يجب أن تفعله فورًا لحماية أموالك... التفاصيل هنا."),
    ("ar", "عاجل: قرار جديد سيغير حياة كل الموظفين ابتداءً من الشهر القادم!! اقرأ التفاصيل كاملة قبل أن يفوتك الأوان، وشارك الخبر مع من تحب."),
    ("ar", "ما فعله هذا الطفل أمام والده أبكى الملايين! قصة مؤثرة لن تستطيع إكمالها دون دموع... الجزء الثاني أغرب من الأول."),
    ("ar", "7 علامات تدل على أن شريك حياتك يخفي عنك سرًا خطيرًا! العلامة الخامسة موجودة عند الجميع تقريبًا، فهل انتبهت لها؟"),
    ("en", "You won't BELIEVE what this man found in his backyard!!! Scientists are speechless. Number 4 will shock you... watch before it gets deleted!"),
    ("en", "Doctors HATE this one simple trick that melts belly fat overnight! Thousands have tried it and the results are unbelievable. Find out the secret now."),
    ("en", "This one mistake is destroying your phone battery, and 99% of people make it every day! Here's what the manufacturers don't want you to know."),
    ("mixed", "شاهد قبل الحذف!!! 🔥 هذا الـ hack البسيط سيجعل هاتفك أسرع 10 مرات، The secret that Apple doesn't want you to know... التفاصيل في أول تعليق 👇"),
    ("ar", "عاجل!! شاهد ماذا حدث في حفل الزفاف الذي أثار ضجة على مواقع التواصل 😱 العروس فعلت شيئًا لم يتوقعه أحد، والعريس انصدم أمام المعازيم! الفيديو انتشر بسرعة البرق وحقق ملايين المشاهدات خلال ساعات... اضغط هنا لمشاهدة الفيديو كاملًا قبل حذفه، ولا تنس مشاركة الخبر مع أصدقائك والاشتراك في قناتنا لتصلك الأخبار الحصرية أولًا بأول!!!"),
]

BROKEN: list[tuple[str, str]] = [
    ("mixed", "تم اطلاق الإصدارالجديد من تطبيقNoon Shopping اليوم،وهو يدعم الدفع عبرApple Pay وSTC pay . المستخدمين يقدروا يحدثوا التطبيق من الستور&nbsp;&nbsp;مباشرة !!!!"),
    ("mixed", "كيف تعمل setup لـ Windows11 على لابتوب جديد ؟؟؟ اولا لازم تعمل bootable USB من موقعmicrosoft الرسمي ، بعدين&nbsp;restart واضغط F12 ... ثم اختار الـUSB من الـboot menu."),
    ("mixed", "<p>مقدمة عن الـMachine Learning&nbsp;:</p><br>التعلم الالي هو فرع منArtificial Intelligence يهتم ببناء models&nbsp;تتعلم من البيانات(data)بدل البرمجة الصريحة .<br><br>"),
    ("mixed", "الاجتماع يوم ال Sunday الساعه 10am في ال meeting room رقم3 ،،، الرجاء احضار ال laptop وال report النهائي !! thanks&amp;regards"),
    ("mixed", "سعر ال iPhone15 Pro Max في السعوديه = 5199ريال ، وفي الامارات =4699درهم . .. الفرق كبير ؟؟؟ شو رايكم&nbsp;!؟"),
    ("mixed", "مرحبا,انا طالب في جامعه القاهرهCairo University قسم Computer Science ,ابحث عن internship في مجال الـ web development صيف 2024 . .اي مساعده؟؟"),
    ("ar", "وزارة&nbsp;الصحة&nbsp;تعلن&nbsp;عن&nbsp;بدء&nbsp;حملة&nbsp;التطعيم&nbsp;الموسمية .. . &quot;اللقاح آمن وفعال&quot; ،، وتدعو الجميع للتسجيل عبر التطبيق!!!!!!"),
    ("ar", "نـــــــص الخبــــــر :ارتفعت درجــات الحرارة اليــــوم الى 48 درجة مئوية في عدد من المــدن ،،،،، وحذرت الارصاد من التعرض المباشر للشمس )ظهرا( ."),
    ("ar", ".اعلنت الشركة عن ارباح بلغت 3.2 مليار ريال خلال الربع الثاني ؟ وهذا يمثل نموا بنسبة 12% .مقارنة بالعام الماضي )حسب البيان الرسمي("),
    ("ar", "ال طقس اليو م في جده حار ورط ب ، ودرج ة الحرار ة العظمى 41 درج ة ، والصغ رى 30 درجة .الرياح شمالية غربي ة خفيفة"),
    ("en", "Welcome&nbsp;to&nbsp;our&nbsp;store!!!!!<br>We sell&amp;deliver the BEST products . . .   Free shipping on orders over $50 ,, call us today ! ! !"),
    ("en", "the meeting is postponed to next week ,sorry for the inconvenience.. please  confirm  your  attendance by replying to this email .thx"),
    ("mixed", "دورة Python للمبتدئين 🐍:\n1-مقدمه عن لغهPython\n2- المتغيرات variables و انواع البيانات data types\n3-الحلقاتloops و الشروط if/else\n4 -المشروع النهائي final project&nbsp;!!"),
    ("mixed", "تقييم المنتج : ⭐⭐⭐⭐ المنتجgood بس التوصيل تاخر3 ايام ،، packaging كان ممتاز&nbsp;&nbsp;. .انصح فيه for sure"),
]
